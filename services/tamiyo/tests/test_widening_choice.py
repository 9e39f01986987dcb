"""Widening in Tamiyo's choice: a widening blueprint only where the job says a layer has a next
layer to widen into, and first there while `prefer_widening` is on."""

from __future__ import annotations

import pytest
from tamiyo_helpers import Driver, layer, report

from esper.contracts import LayerStats
from esper.policy.catalogue import builtin_catalogue
from esper.policy.choice import choose_blueprint
from esper.policy.models import BlueprintRecord

FAST = {"warmup_epochs": 1, "patience": 2, "min_delta": 0.01, "cooldown_epochs": 0}


def widenable(name: str, next_layer: str | None, grad: float) -> LayerStats:
    return layer(name, grad=grad).model_copy(update={"next_layer": next_layer})


def grow(driver: Driver, layers: list[LayerStats]) -> tuple[str, str | None, object]:
    proposals = [p for e in range(4) for p in driver.feed(report("job-1", e, layers=layers))]
    [proposal] = proposals
    return proposal.layer, proposal.blueprint, proposal.evidence.get("widens_into")


def test_the_builtin_catalogue_knows_which_blueprint_widens() -> None:
    widening = [b.name for b in builtin_catalogue() if b.widens]
    assert widening == ["widen"]


def test_a_layer_the_job_reports_widenable_is_widened_into_its_next_layer() -> None:
    layers = [widenable("0", "2", 0.9), widenable("2", "4", 0.3), widenable("4", None, 5.0)]
    assert grow(Driver(**FAST), layers) == ("0", "widen", "2")


def test_a_layer_without_a_next_layer_gets_a_seed_that_stays_inside_it() -> None:
    layers = [widenable("0", None, 0.9), widenable("2", None, 0.3), widenable("4", None, 5.0)]
    name, blueprint, into = grow(Driver(**FAST), layers)
    assert (name, into) == ("0", None)
    assert blueprint == "residual_mlp"  # the preference order's first plain blueprint


def test_prefer_widening_off_leaves_the_strategy_to_choose() -> None:
    layers = [widenable("0", "2", 0.9), widenable("2", "4", 0.3), widenable("4", None, 5.0)]
    driver = Driver(**FAST, prefer_widening=False)
    driver.state.blueprints["widen"] = BlueprintRecord(tried=1)  # diversify: tried already
    assert grow(driver, layers)[1] == "residual_mlp"


def test_widening_that_keeps_failing_gives_way_to_other_blueprints() -> None:
    driver = Driver(**FAST)
    first = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config, True)
    assert first is not None and first.blueprint.name == "widen"
    assert "widen first" in first.why
    failures = driver.config.max_blueprint_failures
    driver.state.blueprints["widen"] = BlueprintRecord(tried=failures, failures=failures)
    then = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config, True)
    assert then is not None and then.blueprint.name == "residual_mlp"


def test_a_widenable_layer_is_ranked_by_what_new_units_there_would_get() -> None:
    """Layer "0" has the weaker own gradient but the larger growth_gain: new units there would
    get more gradient than new units in layer "2", which cannot be widened."""
    first = layer("0", grad=0.1).model_copy(update={"next_layer": "2", "growth_gain": 0.8})
    second = widenable("2", None, 0.5)
    output = widenable("4", None, 5.0)
    driver = Driver(**FAST)
    name, blueprint, into = grow(driver, [first, second, output])
    assert (name, blueprint, into) == ("0", "widen", "2")
    assert driver.state.layers["0"].gain_score == 0.8
    # Without the gain, the own gradients rank them: "2" first, with a plain blueprint.
    plain = [layer("0", grad=0.1).model_copy(update={"next_layer": "2"}), second, output]
    assert grow(Driver(**FAST), plain)[:2] == ("2", "residual_mlp")


# ------------------------------------------------------------------- a narrow layer
def falling(driver: Driver, layers: list[LayerStats], epochs: int = 6) -> list[object]:
    """Epoch reports whose val_loss improves well beyond min_delta every epoch: no plateau."""
    out = []
    for epoch in range(epochs):
        val_loss = 2.0 - 0.1 * epoch
        out += driver.feed(report("job-1", epoch, val_loss, layers=layers, train_loss=val_loss))
    return out


def narrow(ratio: float) -> list[LayerStats]:
    first = layer("0", grad=0.2).model_copy(update={"next_layer": "2", "growth_gain": 0.2 * ratio})
    return [first, widenable("2", None, 0.1), widenable("4", None, 5.0)]


def test_a_narrow_layer_is_widened_before_any_plateau() -> None:
    driver = Driver(**FAST)
    [proposal] = falling(driver, narrow(3.0), epochs=3)
    assert (proposal.action, proposal.layer, proposal.blueprint) == ("germinate", "0", "widen")
    assert proposal.evidence["growth_trigger"] == "bottleneck"
    assert proposal.evidence["bottleneck_score"] == pytest.approx(3.0)
    assert "narrow" in proposal.reason and "3.00×" in proposal.reason


def test_no_growth_below_the_ratio_or_with_the_rule_off() -> None:
    assert falling(Driver(**FAST), narrow(1.5)) == []
    assert falling(Driver(**FAST, bottleneck_ratio=None), narrow(3.0)) == []


def test_an_overfitting_model_is_not_widened_whatever_the_ratio() -> None:
    driver = Driver(**{**FAST, "warmup_epochs": 3}, overfit_patience=2, overfit_gap=0.05)
    proposals = []
    for epoch in range(6):
        # The train loss falls while the val loss rises, away from it.
        train, val = 1.0 - 0.1 * epoch, 1.0 + 0.1 * epoch
        proposals += driver.feed(report("job-1", epoch, val, layers=narrow(3.0), train_loss=train))
    assert proposals == []
    assert "overfitting" in driver.state.note


def test_a_v3_report_says_each_layers_kind_and_a_blueprint_for_it_may_be_chosen() -> None:
    """A user blueprint serving linear and conv2d fits a layer the report says is linear; a
    layer of unknown kind (a v1/v2 report) takes only blueprints serving every kind."""
    from esper.policy import BlueprintInfo

    mine = BlueprintInfo("mine", ("linear", "conv2d"))
    driver = Driver(**FAST)
    stats = [layer(n, grad=g).model_copy(update={"kind": "linear"}) for n, g in LAYERS]
    driver.feed(report("job-1", 0, layers=stats))
    assert driver.state.layers["0"].kind == "linear"
    assert choose_blueprint(driver.state, "linear", [mine], driver.config) is not None
    assert choose_blueprint(driver.state, None, [mine], driver.config) is None


LAYERS = (("0", 0.9), ("2", 0.3), ("4", 5.0))

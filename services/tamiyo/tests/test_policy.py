"""The heuristic policy and the bookkeeping under it: pure, no Redis.

Each test drives one job's state with real contract messages through `tracking` and
`HeuristicPolicy`, as the controller does, and checks what gets decided and why.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from tamiyo_helpers import (
    Driver,
    default_layers,
    layer,
    report,
    running,
    seed,
    taken,
    transition,
)

from esper.contracts import (
    REFUSAL_CODES,
    TRANSIENT_REFUSALS,
    ControlDecision,
    JobStatusChanged,
    RefusalCode,
)
from esper.policy.choice import BlueprintInfo, choose_blueprint, rank_layers
from esper.policy.config import PolicyConfig
from esper.policy.models import BlueprintRecord
from tamiyo.controller import build_decision

FAST: dict[str, Any] = {
    "warmup_epochs": 2,
    "patience": 2,
    "min_delta": 0.01,
    "evaluation_epochs": 2,
}


def germinated(driver: Driver, upto: int = 6, start: int = 0) -> tuple[int, str]:
    """Run a flat job until it germinates; (epoch, decision id)."""
    for epoch in range(start, upto):
        proposals = driver.feed(report(driver.job_id, epoch, 0.69))
        if proposals:
            assert proposals[0].action == "germinate"
            return epoch, driver.state.decisions[-1]
    raise AssertionError(f"no germination by epoch {upto}: {driver.state.note}")


# ------------------------------------------------------------------ plateau
def test_no_germination_during_warmup_even_on_a_plateau() -> None:
    driver = Driver(**{**FAST, "warmup_epochs": 4, "patience": 1})
    assert driver.epochs(0, 4) == []
    assert "warming up" in driver.state.note
    [proposal] = driver.feed(report("job-1", 4, 0.69))
    assert proposal.action == "germinate"


def test_an_improving_loss_is_no_plateau() -> None:
    driver = Driver(**FAST)
    for epoch in range(10):
        assert driver.feed(report("job-1", epoch, 1.0 - 0.02 * epoch)) == []
    assert "no plateau" in driver.state.note


def test_improvements_below_min_delta_are_a_plateau() -> None:
    driver = Driver(**FAST)
    losses = [0.9, 0.8, 0.795, 0.79]  # after epoch 1, improving by less than 0.01 per epoch
    proposals = [p for e, loss in enumerate(losses) for p in driver.feed(report("job-1", e, loss))]
    [proposal] = proposals
    assert proposal.evidence["stale_epochs"] == 2
    assert proposal.evidence["best_val_loss"] == 0.8
    assert proposal.evidence["epoch"] == 3


def test_missing_val_loss_is_no_evidence_of_a_plateau() -> None:
    driver = Driver(**FAST)
    assert driver.epochs(0, 6, val_loss=None) == []
    assert driver.state.stale_epochs == 0
    assert "not measured" in driver.state.note


def test_a_germination_restarts_the_plateau_count() -> None:
    driver = Driver(**FAST)
    germinated(driver)
    assert driver.state.stale_epochs == 0 and driver.state.best_val_loss == 0.69


# --------------------------------------------------------------- the layer
def test_layer_with_the_strongest_live_gradient_is_chosen_not_the_output() -> None:
    driver = Driver(**FAST)
    layers = [layer("0", grad=0.4), layer("2", grad=0.5, dead=0.5), layer("4", grad=9.0)]
    proposals = [p for e in range(4) for p in driver.feed(report("job-1", e, layers=layers))]
    [proposal] = proposals
    # "2": 0.5 × (1 − 0.5) = 0.25 < "0": 0.4; "4" is the output layer
    assert proposal.layer == "0"
    assert proposal.evidence["layer_signal"] == "gradient"
    assert proposal.evidence["runner_up_layer"] == "2"


def test_the_output_layer_can_be_allowed() -> None:
    driver = Driver(**FAST, skip_output_layer=False)
    [proposal] = driver.epochs(0, 4)
    assert proposal.layer == "4"


def test_without_gradient_norms_activation_variance_ranks_the_layers_and_says_so() -> None:
    driver = Driver(**FAST)
    layers = [layer("0", None, 2.0), layer("2", None, 3.0), layer("4", None, 9.0)]
    [proposal] = [p for e in range(4) for p in driver.feed(report("job-1", e, layers=layers))]
    assert proposal.layer == "2"
    assert str(proposal.evidence["layer_signal"]).startswith("activation_variance (fallback")


def test_unmeasured_layers_are_not_ranked_and_nothing_measured_means_no_decision() -> None:
    driver = Driver(**FAST)
    blind = [layer(n, None, None) for n in ("0", "2", "4")]
    assert [p for e in range(5) for p in driver.feed(report("job-1", e, layers=blind))] == []
    assert "no layer can take a seed" in driver.state.note and "not measured" in driver.state.note


def test_signal_is_a_running_average_of_the_reports() -> None:
    driver = Driver(**FAST, signal_smoothing=0.5)
    driver.feed(report("job-1", 0, layers=default_layers((0.2, 0.4, 0.0))))
    driver.feed(report("job-1", 1, kind="step", step=15, layers=default_layers((0.6, 0.0, 0.0))))
    assert driver.state.layers["0"].gradient_score == pytest.approx(0.4)
    assert driver.state.layers["2"].gradient_score == pytest.approx(0.2)


def test_a_layer_without_a_free_slot_is_skipped_until_a_seed_leaves_it() -> None:
    driver = Driver(**FAST, cooldown_epochs=0)
    _, decision_id = germinated(driver)
    assert driver.event(
        taken(
            "job-1",
            decision_id,
            "refused",
            slot=None,
            reason="no free seed slot in layer '2' (slots: ACTIVE)",
            code="no_free_slot",
        )
    )
    assert driver.state.layers["2"].full
    assert driver.state.blueprints["residual_mlp"].failures == 0  # not the blueprint's fault
    ranking = rank_layers(driver.state, driver.config)
    assert [r.name for r in ranking.layers] == ["0"] and ranking.excluded[
        "2"
    ] == "no free seed slot"
    driver.event(transition("job-1", "2", 1, "RECYCLING", "DORMANT", step=500))
    assert not driver.state.layers["2"].full


# ----------------------------------------------------------- the blueprint
def test_diversify_tries_a_new_blueprint_each_time_in_preference_order() -> None:
    driver = Driver(**FAST)
    first = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config)
    assert first is not None and first.blueprint.name == "residual_mlp"
    driver.state.blueprints["residual_mlp"] = BlueprintRecord(tried=1)
    second = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config)
    assert second is not None and second.blueprint.name == "wide_mlp"


def test_only_blueprints_that_fit_the_layer_kind_are_chosen() -> None:
    driver = Driver(**FAST, blueprints=["conv3x3", "wide_mlp", "low_rank"])

    def chosen(kind: str | None) -> str | None:
        choice = choose_blueprint(driver.state, kind, driver.catalogue, driver.config)
        return None if choice is None else choice.blueprint.name

    assert (chosen("conv2d"), chosen("linear")) == ("conv3x3", "wide_mlp")
    assert chosen(None) == "low_rank"  # kind unknown: only a blueprint serving every kind


def test_specialize_picks_the_best_measured_blueprint() -> None:
    driver = Driver(**FAST, strategy="specialize")
    first = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config)
    assert first is not None and "no basis yet" in first.why
    for name, best in (("residual_mlp", 0.05), ("bottleneck", 0.2), ("low_rank", -0.1)):
        driver.state.blueprints[name] = BlueprintRecord(tried=1, best_contribution=best)
    choice = choose_blueprint(driver.state, "linear", driver.catalogue, driver.config)
    assert choice is not None and choice.blueprint.name == "bottleneck"


def test_ensemble_grows_the_last_kept_blueprint_again() -> None:
    driver = Driver(**FAST, strategy="ensemble", blueprints=["bottleneck", "residual_mlp"])
    epoch, decision_id = germinated(driver)
    assert driver.state.pending is not None and driver.state.pending.blueprint == "bottleneck"
    keep_seed(driver, epoch, decision_id)
    choice = choose_blueprint(driver.state, None, driver.catalogue, driver.config)
    assert choice is not None and choice.blueprint.name == "bottleneck"
    assert choice.why.startswith("ensemble")


def test_a_blueprint_that_keeps_failing_is_not_chosen_again() -> None:
    driver = Driver(**FAST, max_blueprint_failures=2, blueprints=["residual_mlp", "bottleneck"])
    chosen = []
    epoch = 0
    for _ in range(3):
        epoch, decision_id = germinated(driver, upto=epoch + 10, start=epoch)
        chosen.append(driver.state.pending.blueprint)  # type: ignore[union-attr]
        driver.event(
            taken(
                "job-1",
                decision_id,
                "refused",
                slot=None,
                reason="compile failed",
                code="kernel_unavailable",
            )
        )
        epoch += 1
    # diversify: residual_mlp, bottleneck, then the least tried that is not penalised yet
    assert chosen == ["residual_mlp", "bottleneck", "residual_mlp"]
    assert driver.state.blueprints["residual_mlp"].failures == 2
    choice = choose_blueprint(driver.state, None, driver.catalogue, driver.config)
    assert choice is not None and choice.blueprint.name == "bottleneck"
    driver.state.blueprints["bottleneck"].failures = 2
    assert choose_blueprint(driver.state, None, driver.catalogue, driver.config) is None
    assert driver.epochs(epoch, epoch + 8) == []
    assert "no blueprint fits" in driver.state.note


# ---------------------------------------------------- one germination at a time
def test_one_germination_in_flight_until_the_seed_is_judged() -> None:
    driver = Driver(**FAST)
    epoch, decision_id = germinated(driver)
    assert driver.epochs(epoch + 1, epoch + 3) == []
    assert "in flight" in driver.state.note
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    ramping = [seed("2", 0, alpha=0.4)]
    assert driver.feed(report("job-1", epoch + 3, seeds=ramping)) == []
    assert "ramping" in driver.state.note


def keep_seed(driver: Driver, epoch: int, decision_id: str, contribution: float = 0.2) -> int:
    """Answer the germination, ramp, wait out the window; the epoch of the verdict."""
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    e = epoch + 1
    driver.feed(report("job-1", e, seeds=[seed("2", 0, alpha=1.0, contribution=0.0)]))
    for e in range(epoch + 2, epoch + 2 + driver.config.evaluation_epochs):
        proposals = driver.feed(
            report("job-1", e, seeds=[seed("2", 0, alpha=1.0, contribution=contribution)])
        )
        if proposals:
            return e
    raise AssertionError(f"no verdict: {driver.state.note}")


def test_a_seed_that_helps_is_kept_after_its_evaluation_window() -> None:
    driver = Driver(**FAST)
    epoch, decision_id = germinated(driver)
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    proposals = driver.feed(report("job-1", epoch + 1, seeds=[seed("2", 0, contribution=0.01)]))
    track = driver.state.track("2", 0)
    assert proposals == [] and track is not None and track.ramp_done_epoch == epoch + 1
    assert driver.feed(report("job-1", epoch + 2, seeds=[seed("2", 0, contribution=0.2)])) == []
    [keep] = driver.feed(report("job-1", epoch + 3, seeds=[seed("2", 0, contribution=0.25)]))
    assert (keep.action, keep.layer, keep.seed) == ("keep", "2", 0)
    assert keep.evidence["contribution"] == 0.25 and keep.evidence["keep_threshold"] == 0.01
    assert track.verdict == "keep"
    assert driver.state.blueprints["residual_mlp"].kept == 1


def test_a_seed_that_does_not_help_is_retired_then_a_cooldown_follows() -> None:
    driver = Driver(**{**FAST, "cooldown_epochs": 3, "retire_ramp_steps": 7})
    epoch, decision_id = germinated(driver)
    verdict_epoch = keep_seed(driver, epoch, decision_id, contribution=0.0)
    track = driver.state.track("2", 0)
    assert track is not None and track.verdict == "retire"
    assert driver.state.blueprints["residual_mlp"].failures == 1
    assert driver.state.cooldown_until == verdict_epoch + 3
    gone = [seed("2", 0, state="RETIRING", alpha=0.5)]
    assert driver.feed(report("job-1", verdict_epoch + 1, seeds=gone)) == []
    assert driver.feed(report("job-1", verdict_epoch + 2)) == []  # the slot is DORMANT again
    assert driver.state.track("2", 0) is None
    assert "cooling down" in driver.state.note


def test_retire_decision_carries_the_ramp_and_the_measured_contribution() -> None:
    driver = Driver(**{**FAST, "retire_ramp_steps": 7})
    epoch, decision_id = germinated(driver)
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    driver.feed(report("job-1", epoch + 1, seeds=[seed("2", 0)]))
    driver.feed(report("job-1", epoch + 2, seeds=[seed("2", 0, contribution=-0.01)]))
    [retire] = driver.feed(report("job-1", epoch + 3, seeds=[seed("2", 0, contribution=-0.02)]))
    assert (retire.action, retire.seed, retire.ramp_steps) == ("retire", 0, 7)
    assert retire.evidence["contribution"] == -0.02
    assert "< keep_threshold" in retire.reason


def test_no_verdict_without_a_contribution_measured_in_this_report() -> None:
    driver = Driver(**FAST)
    epoch, decision_id = germinated(driver)
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    for e in range(epoch + 1, epoch + 6):
        assert driver.feed(report("job-1", e, seeds=[seed("2", 0, contribution=None)])) == []
    assert "no measured contribution" in driver.state.note


def test_a_seed_that_dies_during_evaluation_charges_its_blueprint() -> None:
    driver = Driver(**FAST)
    epoch, decision_id = germinated(driver)
    driver.event(taken("job-1", decision_id, "applied", slot=0))
    driver.feed(report("job-1", epoch + 1, seeds=[seed("2", 0)]))
    driver.event(transition("job-1", "2", 0, "RECYCLING", "DORMANT", step=999))
    assert driver.state.track("2", 0) is None
    assert driver.state.blueprints["residual_mlp"].failures == 1


# ---------------------------------------------------------------- caps
def test_the_seed_cap_stops_germination() -> None:
    driver = Driver(**FAST, max_seeds_per_job=1)
    epoch, decision_id = germinated(driver)
    keep_seed(driver, epoch, decision_id)
    live = [seed("2", 0, contribution=0.2)]
    assert [
        p for e in range(epoch + 5, epoch + 12) for p in driver.feed(report("job-1", e, seeds=live))
    ] == []
    assert "max_seeds_per_job 1 reached" in driver.state.note


def test_the_jobs_own_seed_cap_is_learned_from_its_refusal() -> None:
    driver = Driver(**FAST, cooldown_epochs=0)
    epoch, decision_id = germinated(driver)
    driver.event(
        taken(
            "job-1",
            decision_id,
            "refused",
            slot=None,
            reason="max_seeds reached: the job holds 0 seed(s) and max_seeds is 0",
            code="max_seeds",
        )
    )
    assert driver.state.seed_cap == 0
    assert driver.epochs(epoch + 1, epoch + 6) == []
    assert "the job's own max_seeds" in driver.state.note


def test_a_refused_blueprint_is_charged_and_cools_the_job_down() -> None:
    driver = Driver(**{**FAST, "cooldown_epochs": 2})
    epoch, decision_id = germinated(driver)
    driver.event(
        taken(
            "job-1",
            decision_id,
            "refused",
            slot=None,
            reason="no kernel for blueprint",
            code="kernel_unavailable",
        )
    )
    assert driver.state.pending is None
    assert driver.state.blueprints["residual_mlp"].failures == 1
    assert driver.state.cooldown_until == epoch + 2


def refusal_effect(code: RefusalCode, reason: str) -> tuple[object, ...]:
    """What a refusal of a fresh germination changes: (layer full, seed cap, morphogenesis off,
    blueprint failures, epochs of cooldown)."""
    driver = Driver(**{**FAST, "cooldown_epochs": 2})
    epoch, decision_id = germinated(driver)
    refusal = taken("job-1", decision_id, "refused", slot=None, reason=reason, code=code)
    assert driver.event(refusal)
    state = driver.state
    assert state.pending is None and state.cooldown_until is not None
    failures = tuple(sorted((n, r.failures) for n, r in state.blueprints.items() if r.failures))
    return (
        state.layers["2"].full,
        state.seed_cap,
        state.morphogenesis_off,
        failures,
        state.cooldown_until - epoch,
    )


WORDINGS = (
    "no free seed slot in layer '2' (slots: ACTIVE)",
    "max_seeds reached: the job holds 0 seed(s) and max_seeds is 0",
    "morphogenesis is off for this job",
    "compile failed",
    "every slot of this layer is taken",
)


# The transient ones ("not now") have their own tests below: a short cooldown, nobody charged.
@pytest.mark.parametrize("code", [c for c in REFUSAL_CODES if c not in TRANSIENT_REFUSALS])
def test_a_refusal_is_acted_on_by_its_code_whatever_its_words(code: RefusalCode) -> None:
    effects = {refusal_effect(code, reason) for reason in WORDINGS}
    assert len(effects) == 1, effects
    [(full, cap, off, failures, cooldown)] = effects
    assert cooldown == 2
    assert full is (code == "no_free_slot")
    assert cap == (0 if code == "max_seeds" else None)
    assert off is (code == "morphogenesis_off")
    charged = code not in ("no_free_slot", "max_seeds", "morphogenesis_off")
    assert failures == ((("residual_mlp", 1),) if charged else ())


def test_the_same_words_under_another_code_act_differently() -> None:
    words = "no free seed slot in layer '2' (slots: ACTIVE)"
    codes: tuple[RefusalCode, ...] = (
        "no_free_slot",
        "max_seeds",
        "morphogenesis_off",
        "kernel_unavailable",
    )
    effects = {code: refusal_effect(code, words) for code in codes}
    assert len(set(effects.values())) == len(codes), effects
    assert effects["no_free_slot"][0] is True
    assert effects["kernel_unavailable"][0] is False
    assert effects["kernel_unavailable"][3] == (("residual_mlp", 1),)


def test_a_transient_refusal_charges_nobody_and_the_growth_is_decided_again() -> None:
    """Urza was unreachable until the job's deadline (`kernel_unreachable`): the blueprint is
    not penalised, and after the short retry cooldown (not the full one) the same growth is
    decided again, the plateau that called for it still standing."""
    driver = Driver(**{**FAST, "cooldown_epochs": 5, "retry_cooldown_epochs": 1})
    epoch, decision_id = germinated(driver)
    stale = driver.state.pending.stale_epochs  # type: ignore[union-attr]
    assert stale >= FAST["patience"]
    refusal = taken(
        "job-1",
        decision_id,
        "refused",
        slot=None,
        reason="no kernel for blueprint 'residual_mlp' on layer '2': unreachable for 30.0 s",
        code="kernel_unreachable",
    )
    assert refusal.transient
    assert driver.event(refusal)

    state = driver.state
    assert state.pending is None and state.cooldown_until == epoch + 1
    record = state.blueprints["residual_mlp"]
    assert (record.failures, record.tried) == (0, 0)
    assert not state.layers["2"].full and state.layers["2"].failures == 0
    assert state.stale_epochs == stale and "refused for now" in state.note
    assert driver.feed(report("job-1", epoch + 1, 0.69)) == []  # the retry cooldown
    assert "cooling down" in driver.state.note
    [again] = driver.feed(report("job-1", epoch + 2, 0.69))
    assert (again.action, again.layer) == ("germinate", "2")
    assert again.blueprint == "residual_mlp"  # diversify: it still counts as never tried


def test_transient_refusals_repeated_never_penalise_the_blueprint() -> None:
    driver = Driver(
        **{**FAST, "retry_cooldown_epochs": 0, "max_blueprint_failures": 1},
        blueprints=["residual_mlp"],
    )
    epoch = 0
    for _ in range(4):
        epoch, decision_id = germinated(driver, upto=epoch + 4, start=epoch)
        driver.event(
            taken(
                "job-1",
                decision_id,
                "refused",
                slot=None,
                reason="Urza unreachable",
                code="kernel_unreachable",
            )
        )
        epoch += 1  # retry_cooldown_epochs 0: the very next epoch report may germinate again
    assert driver.state.blueprints["residual_mlp"].failures == 0
    assert driver.state.germinations == 4


def test_a_transient_refusal_after_the_loss_improved_leaves_the_fresh_plateau() -> None:
    """Reports read while the job retried showed a new best: that plateau is over, and a new one
    must form before the next germination."""
    driver = Driver(**{**FAST, "retry_cooldown_epochs": 0})
    epoch, decision_id = germinated(driver)
    driver.feed(report("job-1", epoch + 1, 0.5))  # better than 0.69 by more than min_delta
    driver.event(
        taken("job-1", decision_id, "refused", slot=None, reason="x", code="kernel_unreachable")
    )
    assert (driver.state.best_val_loss, driver.state.stale_epochs) == (0.5, 0)
    assert driver.feed(report("job-1", epoch + 2, 0.5)) == []
    assert "no plateau" in driver.state.note


def test_a_germination_never_answered_is_given_up() -> None:
    driver = Driver(**FAST, decision_timeout_epochs=2, cooldown_epochs=1)
    epoch, _ = germinated(driver)
    assert driver.epochs(epoch + 1, epoch + 4) == []  # given up at +2, cooling down at +3
    assert driver.state.pending is None and driver.state.cooldown_until == epoch + 3
    [again] = driver.epochs(epoch + 4, epoch + 5)
    assert again.action == "germinate"


def test_a_late_answer_after_the_timeout_still_adopts_the_seed() -> None:
    """Telemetry and events are separate streams: a backlog of reports can be read before the
    job's answer. The answer still makes the seed Tamiyo's to judge, dated by those reports."""
    driver = Driver(**FAST, decision_timeout_epochs=2, cooldown_epochs=5)
    epoch, decision_id = germinated(driver)
    listed = [seed("2", 0, contribution=0.1)]
    for e in range(epoch + 1, epoch + 4):  # the seed is in these reports; the answer is late
        assert driver.feed(report("job-1", e, seeds=listed)) == []
    assert driver.state.pending is None and driver.state.abandoned is not None
    assert driver.event(taken("job-1", decision_id, "applied", slot=0))
    track = driver.state.track("2", 0)
    assert track is not None and track.origin == "tamiyo" and track.blueprint == "residual_mlp"
    assert track.ramp_done_epoch == epoch + 1
    [keep] = driver.feed(report("job-1", epoch + 4, seeds=listed))
    assert keep.action == "keep"


# ----------------------------------------------------------- bad input
def test_duplicate_and_out_of_order_reports_change_nothing() -> None:
    driver = Driver(**FAST)
    driver.epochs(0, 3)
    before = driver.state.model_dump()
    assert driver.feed(report("job-1", 2, 0.1)) == []  # a duplicate of epoch 2, other values
    assert driver.feed(report("job-1", 1, 0.1)) == []  # late
    assert driver.feed(report("job-1", 1, kind="step", step=999)) == []  # a step of a closed epoch
    assert driver.state.model_dump() == before


def test_a_job_first_seen_mid_training_gets_no_decision_until_seen_running() -> None:
    driver = Driver(**FAST)
    assert driver.epochs(5, 10) == []
    assert not driver.state.known and "unknown job" in driver.state.note
    driver.event(running("job-1"))
    [proposal] = driver.epochs(10, 11)
    assert proposal.action == "germinate"


def test_a_finished_job_gets_no_decision() -> None:
    driver = Driver(**FAST)
    driver.epochs(0, 2)
    driver.event(JobStatusChanged(job_id="job-1", status="SUCCEEDED", previous="RUNNING"))
    assert driver.epochs(2, 8) == []


def test_a_disabled_policy_decides_nothing() -> None:
    driver = Driver(**FAST, enabled=False)
    assert driver.epochs(0, 8) == []
    assert "disabled" in driver.state.note


@pytest.mark.parametrize(
    "field, value",
    [
        ("patience", -1),
        ("patience", 0),
        ("max_seeds_per_job", -1),
        ("warmup_epochs", -2),
        ("min_delta", -0.1),
        ("target_alpha", 0.0),
        ("target_alpha", 1.5),
        ("signal_smoothing", 1.0),
        ("strategy", "random"),
        ("blueprints", []),
        ("blueprints", ["wide_mlp", "wide_mlp"]),
        ("blueprints", ["Not-A-Name"]),
        ("min_delta", float("nan")),
        ("no_such_threshold", 1),
    ],
)
def test_impossible_policies_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        PolicyConfig.model_validate({field: value})


def test_every_proposal_is_a_valid_complete_decision() -> None:
    driver = Driver(**FAST)
    proposals = driver.epochs(0, 4)
    [germinate] = proposals
    decision = build_decision("job-1", "tmy-x", germinate, "trigger-1")
    assert isinstance(decision, ControlDecision)
    assert (decision.job_id, decision.layer, decision.seed) == ("job-1", "2", None)
    assert decision.blueprint == "residual_mlp" and decision.blend == "add"
    assert decision.strategy == "diversify" and decision.alpha == 1.0
    assert decision.ramp_steps == driver.config.ramp_steps
    assert decision.evidence["trigger"] == "trigger-1" and decision.reason


def test_blueprint_info_fits() -> None:
    every = BlueprintInfo("all", ("linear", "conv2d", "conv1d"))
    two = BlueprintInfo("a_b", ("linear", "conv2d"))
    linear = BlueprintInfo("lin", ("linear",))
    assert every.fits(None) and every.fits("conv1d")
    assert two.fits("conv2d") and not two.fits("conv1d") and not two.fits(None)
    assert linear.fits("linear") and not linear.fits("conv2d") and not linear.fits(None)


def test_a_layer_where_growth_failed_goes_after_the_others() -> None:
    driver = Driver(**{**FAST, "cooldown_epochs": 0})
    epoch, decision_id = germinated(driver)  # layer "2": the strongest signal
    verdict = keep_seed(driver, epoch, decision_id, contribution=-0.01)
    assert driver.state.layers["2"].failures == 1
    driver.feed(report("job-1", verdict + 1))  # the seed is gone
    [again] = driver.epochs(verdict + 2, verdict + 6)
    assert again.layer == "0" and again.evidence["runner_up_layer"] == "2"

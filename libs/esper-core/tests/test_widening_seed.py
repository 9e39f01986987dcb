"""Widening seeds in Kasmina: a seed of layer A that adds hidden units between A and the next
layer B (reads A's input, adds to B's output), and its data-driven fan-in."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from torch import nn

import esper
from esper.contracts.control import ControlDecision
from esper.contracts.jobs import MorphogenesisSpec
from esper.exceptions import ConfigError
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.state import BlendMode, SeedState
from esper.training import LocalKernelProvider, SeedOrchestrator
from esper.training.widening import init_from_gradients


def mlp(features: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(features, 6), nn.ReLU(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)
    )


def seat(kl: KasminaLayer, module: nn.Module, seed: int = 0, alpha: float = 1.0) -> None:
    """A seed module put in a slot the way MorphableModel.load_kernel does after its checks."""
    kl.begin_load(seed, "test")
    kl.mark_loading(seed, "test-kernel")
    kl.attach(seed, module, alpha=alpha, widens=True)


def units(k: int, a: int = 4, b: int = 3) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(a, k), nn.ReLU(), nn.Linear(k, b))


def test_wrap_pairs_each_layer_with_the_next_one_through_activations() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2)
    assert morphable.layer("0").next_layer == "2"
    assert morphable.layer("2").next_layer == "4"
    assert morphable.layer("4").next_layer is None
    assert morphable.layer("0").widening_signature is not None
    assert morphable.layer("4").widening_signature is None


def test_no_pair_across_a_pooling_layer_or_into_an_unwrapped_layer() -> None:
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    )
    morphable = esper.wrap(cnn, seeds_per_layer=1)
    assert morphable.layer("0").next_layer is None
    only_first = esper.wrap(mlp(), seeds_per_layer=1, layers=["0"])
    assert only_first.layer("0").next_layer is None


def test_a_widening_seed_is_the_network_with_more_hidden_units() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2)
    first, second = morphable.layer("0"), morphable.layer("2")
    x = torch.randn(32, 4)
    before = morphable(x)
    seed = units(5)
    seat(first, seed)
    # Born with a zero fan-out it changes nothing; with a trained fan-out it is a wider layer.
    nn.init.zeros_(seed[2].weight)
    nn.init.zeros_(seed[2].bias)
    assert torch.equal(morphable(x), before)
    nn.init.normal_(seed[2].weight)
    wide = nn.Linear(4, 11)
    second_wide = nn.Linear(11, 3)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([first.base_layer.weight, seed[0].weight]))
        wide.bias.copy_(torch.cat([first.base_layer.bias, seed[0].bias]))
        second_wide.weight.copy_(torch.cat([second.base_layer.weight, seed[2].weight], dim=1))
        second_wide.bias.copy_(second.base_layer.bias + seed[2].bias)
    head = morphable.layer("4").base_layer
    explicit = head(torch.tanh(second_wide(torch.relu(wide(x)))))
    torch.testing.assert_close(morphable(x), explicit)
    # α scales the new units' fan-out, and the seed's parameters get gradients.
    with morphable.seed_alpha_forced("0", 0, 0.0):
        torch.testing.assert_close(morphable(x), before)
    morphable(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.parameters())


def test_retiring_the_seed_gives_the_downstream_layer_back_its_own_output() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2, dormant_bypass=True)
    x = torch.randn(8, 4)
    before = morphable(x)
    seat(morphable.layer("0"), units(5))
    assert not torch.equal(morphable(x), before)
    morphable.retire_seed("0", 0)
    assert morphable.layer("0").seed_info(0).state is SeedState.DORMANT
    assert torch.equal(morphable(x), before)
    assert morphable.layer("2")._fed is False


def test_only_layers_with_a_downstream_take_widening_seeds_and_only_added() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2)
    last = morphable.layer("4")
    last.begin_load(0, "test")
    last.mark_loading(0, "test-kernel")
    with pytest.raises(ConfigError, match="no downstream layer"):
        last.attach(0, units(3, 3, 2), widens=True)
    first = morphable.layer("0")
    first.begin_load(0, "test")
    first.mark_loading(0, "test-kernel")
    with pytest.raises(ConfigError, match="blend is 'add'"):
        first.attach(0, units(5), blend=BlendMode.LERP, widens=True)


def test_a_seed_of_the_wrong_output_shape_falls_back_and_trips_the_breaker() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2)
    x = torch.randn(8, 4)
    before = morphable(x)
    seat(morphable.layer("0"), units(5, 4, 7))  # gives 7 features, the next layer 3
    for _ in range(3):
        assert torch.equal(morphable(x), before)
    info = morphable.layer("0").seed_info(0)
    assert info.state is SeedState.DORMANT
    assert morphable.layer("2")._fed is False


def test_a_copy_keeps_its_own_pairs() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=2)
    seat(morphable.layer("0"), units(5))
    clone = copy.deepcopy(morphable)
    assert clone.layer("0").downstream is clone.layer("2")
    x = torch.randn(8, 4)
    torch.testing.assert_close(clone(x), morphable(x))
    with torch.no_grad():
        next(clone.layer("0").seed_module(0).parameters()).add_(1.0)  # type: ignore[union-attr]
    assert not torch.allclose(clone(x), morphable(x))


def test_the_data_init_points_new_units_where_the_error_is() -> None:
    """Fan-out zero, so the function is unchanged at birth; trained alone for 30 steps, a seed
    started from the data takes the loss lower than seeds with random directions of the same
    scale. The label depends on 2 of the 32 input features: random directions mostly miss them."""
    torch.manual_seed(3)
    x = torch.randn(512, 32)
    y = (x[:, 0] + x[:, 1] > 0).long()

    def trained_loss(init: bool, draw: int) -> float:
        morphable = esper.wrap(mlp(32), seeds_per_layer=1)
        torch.manual_seed(draw)
        seed = nn.Sequential(nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 3))
        nn.init.zeros_(seed[2].weight)
        nn.init.zeros_(seed[2].bias)
        kl = morphable.layer("0")
        scale = kl.base_layer.weight.norm(dim=1).mean()
        with torch.no_grad():  # random directions at the data init's scale
            seed[0].weight.copy_(nn.functional.normalize(seed[0].weight, dim=1) * scale)
        seat(kl, seed)
        with torch.no_grad():
            before = morphable(x)

        def loss() -> torch.Tensor:
            return nn.functional.cross_entropy(morphable(x), y)

        if init:
            assert "singular direction" in init_from_gradients(kl, 0, loss)
        with torch.no_grad():
            assert torch.equal(morphable(x), before)
        optimizer = torch.optim.SGD(seed.parameters(), lr=0.5)
        for _ in range(30):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
        return float(loss().detach())

    from_data = trained_loss(init=True, draw=0)
    assert from_data < min(trained_loss(init=False, draw=d) for d in range(3))


def test_the_data_init_refuses_a_seed_that_does_not_widen() -> None:
    morphable = esper.wrap(mlp(), seeds_per_layer=1)
    with pytest.raises(ValueError, match="not a widening seed"):
        init_from_gradients(morphable.layer("0"), 0, lambda: torch.zeros(()))


# ------------------------------------------------------- through the orchestrator, compiled
def test_germinating_widen_compiles_starts_from_the_data_and_survives_a_checkpoint() -> None:
    registry = esper.LocalKernelRegistry()
    kernels = esper.KernelCache([registry])
    morphable = esper.wrap(mlp(8), seeds_per_layer=2, kernels=kernels)
    torch.manual_seed(5)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    before = morphable(x).detach()

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(morphable(x), y)

    orchestrator = SeedOrchestrator(
        morphable,
        "job-w",
        LocalKernelProvider(registry),
        MorphogenesisSpec(enabled=True, ramp_steps=0),
        lambda message: None,
        loss_on_sample=loss,
    )
    decision = ControlDecision(
        decision_id="d-w",
        job_id="job-w",
        action="germinate",
        layer="0",
        blueprint="widen",
        reason="test",
    )
    taken = asyncio.run(orchestrator.execute(decision, step=0, epoch=0))
    assert taken.outcome == "applied", taken.reason
    assert "widening into '2'" in taken.reason and "singular direction" in taken.reason
    info = morphable.layer("0").seed_info(taken.seed or 0)
    assert info.widens and info.alpha == 1.0
    meta = registry.lookup(info.kernel_id or "")
    assert meta.host.downstream is not None and meta.host.downstream.out_features == 3
    torch.testing.assert_close(morphable(x), before)  # function-preserving at birth

    # Trained a little, saved, and restored into a freshly wrapped model: the same function.
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    restored = esper.wrap(mlp(8), seeds_per_layer=2, kernels=kernels)
    restored.load_state_dict(morphable.state_dict())
    assert restored.layer("0").seed_info(taken.seed or 0).widens
    torch.testing.assert_close(restored(x), morphable(x))


def test_a_plain_blueprint_on_a_widenable_layer_stays_in_the_layer() -> None:
    registry = esper.LocalKernelRegistry()
    morphable = esper.wrap(mlp(8), seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    orchestrator = SeedOrchestrator(
        morphable,
        "job-p",
        LocalKernelProvider(registry),
        MorphogenesisSpec(enabled=True),
        lambda message: None,
    )
    decision = ControlDecision(
        decision_id="d-p",
        job_id="job-p",
        action="germinate",
        layer="0",
        blueprint="low_rank",
        reason="test",
    )
    taken = asyncio.run(orchestrator.execute(decision, step=0, epoch=0))
    assert taken.outcome == "applied", taken.reason
    info = morphable.layer("0").seed_info(taken.seed or 0)
    assert not info.widens
    assert registry.lookup(info.kernel_id or "").host.downstream is None


# ------------------------------------------------------------------------- telemetry
def test_sampled_steps_report_each_layers_next_layer_and_growth_gain() -> None:
    from esper.training import TelemetryReporter

    morphable = esper.wrap(mlp(4), seeds_per_layer=1)
    reports: list[object] = []
    reporter = TelemetryReporter(morphable, "job-t", reports.append, every_steps=1)
    torch.manual_seed(2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    # The expected gain, computed by hand: the next layer's output gradient against the input.
    captured: dict[str, torch.Tensor] = {}
    second = morphable.layer("2")
    handle = second.register_forward_hook(lambda m, a, out: captured.update(y=out))
    loss = nn.functional.cross_entropy(morphable(x), y)
    (g,) = torch.autograd.grad(loss, captured["y"])
    handle.remove()
    expected = float(torch.linalg.matrix_norm(g.T @ x))

    reporter.begin_step(0)
    loss = nn.functional.cross_entropy(morphable(x), y)
    loss.backward()
    report = reporter.end_step(0, 0, loss)
    assert report is not None
    stats = {s.layer: s for s in report.layers}
    assert (stats["0"].next_layer, stats["2"].next_layer, stats["4"].next_layer) == ("2", "4", None)
    assert {s.kind for s in report.layers} == {"linear"}
    assert stats["0"].growth_gain == pytest.approx(expected, rel=1e-5)
    assert stats["2"].growth_gain is not None and stats["2"].growth_gain > 0
    assert stats["4"].growth_gain is None
    # Without gradients (an epoch's sampling pass) nothing is claimed.
    unsampled = {s.layer: s for s in reporter.sample_layers(x)}
    assert unsampled["0"].growth_gain is None

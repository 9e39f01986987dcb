"""α ramps: AlphaRamp values and validation, ramps and retirement ramps driven by step()."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import esper
from esper.exceptions import AlphaRangeError, ConfigError, LerpBudgetError, SeedStateError
from esper.kasmina import AlphaRamp, BlendMode, KasminaLayer, LifecycleEvent, SeedState

S = SeedState
KID = "krn_" + "ef" * 12
unit = st.floats(0.0, 1.0)


def attach(layer: KasminaLayer, seed: int, *, blend: str = "add", alpha: float = 0.0) -> None:
    layer.begin_load(seed, "test")
    layer.mark_loading(seed, KID)
    d_in, d_out = layer.signature.in_features, layer.signature.out_features
    layer.attach(seed, nn.Linear(d_in, d_out), blend=BlendMode(blend), alpha=alpha)


def alpha_of(layer: KasminaLayer, seed: int) -> float:
    """α as the forward reads it; must agree with the Python mirror."""
    value = float(layer.layout.alpha[seed])
    assert value == pytest.approx(layer.seed_info(seed).alpha, abs=1e-7)
    return value


# ============================================================================ AlphaRamp
def test_linear_ramp_values() -> None:
    ramp = AlphaRamp(0.0, 1.0, 4)
    assert ramp.value() == 0.0 and not ramp.done
    assert [ramp.advance() for _ in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert ramp.done


def test_linear_ramp_down_values() -> None:
    ramp = AlphaRamp(0.8, 0.2, 3)
    values = [ramp.advance() for _ in range(3)]
    assert values == pytest.approx([0.6, 0.4, 0.2])
    assert values[-1] == 0.2  # exactly the target at the end


def test_cosine_ramp_values() -> None:
    ramp = AlphaRamp(0.0, 1.0, 4, "cosine")
    expected = [0.5 - 0.5 * math.cos(math.pi * t / 4) for t in (1, 2, 3)]
    assert [ramp.advance() for _ in range(3)] == pytest.approx(expected)
    assert expected[0] < 0.25 < 0.75 < expected[2]  # slow start, slow end
    assert ramp.advance() == 1.0 and ramp.done


def test_cosine_ramp_between_arbitrary_endpoints() -> None:
    ramp = AlphaRamp(0.9, 0.3, 2, "cosine")
    assert ramp.advance() == pytest.approx(0.6)
    assert ramp.advance() == 0.3


def test_ramp_stays_at_target_once_done() -> None:
    ramp = AlphaRamp(0.2, 0.7, 2)
    for _ in range(2):
        ramp.advance()
    assert [ramp.advance() for _ in range(3)] == [0.7, 0.7, 0.7]
    assert ramp.t == 2 and ramp.value() == pytest.approx(0.7)


@settings(max_examples=30, deadline=None)
@given(
    start=unit,
    target=unit,
    steps=st.integers(1, 50),
    shape=st.sampled_from(["linear", "cosine"]),
)
def test_ramp_is_monotone_bounded_and_ends_on_target(
    start: float, target: float, steps: int, shape: Any
) -> None:
    ramp = AlphaRamp(start, target, steps, shape)
    values = [start] + [ramp.advance() for _ in range(steps)]
    low, high = min(start, target), max(start, target)
    assert all(low - 1e-12 <= v <= high + 1e-12 for v in values)
    pairs = list(itertools.pairwise(values))
    if target >= start:
        assert all(b >= a - 1e-12 for a, b in pairs)
    else:
        assert all(b <= a + 1e-12 for a, b in pairs)
    assert values[-1] == target and ramp.done


def test_ramp_round_trips_through_a_dict_mid_way() -> None:
    ramp = AlphaRamp(0.1, 0.9, 5, "cosine", then_retire=True)
    ramp.advance()
    ramp.advance()
    restored = AlphaRamp.from_dict(ramp.to_dict())
    assert restored == ramp
    assert [restored.advance() for _ in range(3)] == [ramp.advance() for _ in range(3)]


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "3"])
def test_ramp_refuses_bad_step_counts(steps: Any) -> None:
    with pytest.raises(ConfigError, match="ramp steps must be an integer ≥ 1"):
        AlphaRamp(0.0, 1.0, steps)


def test_ramp_refuses_unknown_shapes() -> None:
    with pytest.raises(ConfigError, match=r"'linear' or 'cosine'.*'exponential'"):
        AlphaRamp(0.0, 1.0, 3, "exponential")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, 1.1, math.nan, math.inf, True, "0.5"])
@pytest.mark.parametrize("which", ["start", "target"])
def test_ramp_refuses_alpha_outside_the_unit_interval(which: str, bad: Any) -> None:
    args = {"start": 0.5, "target": 0.5, which: bad}
    with pytest.raises(AlphaRangeError, match=f"ramp {which}"):
        AlphaRamp(args["start"], args["target"], 3)


# ============================================================= ramps on a layer, step by step
def test_layer_ramp_moves_alpha_each_advance_and_then_stops() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    attach(layer, 0, alpha=0.2)
    layer.start_ramp(0, 0.8, 3)
    assert alpha_of(layer, 0) == pytest.approx(0.2)  # starting a ramp does not move α yet
    seen = []
    for _ in range(5):
        layer.advance()
        seen.append(alpha_of(layer, 0))
    assert seen == pytest.approx([0.4, 0.6, 0.8, 0.8, 0.8])
    assert all(s.ramp is None for s in layer._slots)


def test_set_alpha_cancels_a_running_ramp() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    attach(layer, 0)
    layer.start_ramp(0, 1.0, 10)
    layer.advance()
    layer.set_alpha(0, 0.05)
    layer.advance()
    assert alpha_of(layer, 0) == pytest.approx(0.05)


def test_ramp_on_a_seed_that_is_not_active_is_refused() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    with pytest.raises(SeedStateError, match=r"cannot ramp α: seed 1 of layer 'fc' is DORMANT"):
        layer.start_ramp(1, 0.5, 3)
    attach(layer, 1, alpha=0.5)
    layer.retire(1, "going", ramp_steps=4)
    with pytest.raises(SeedStateError, match=r"seed 1 of layer 'fc' is RETIRING"):
        layer.start_ramp(1, 0.5, 3)


def test_ramp_target_is_held_against_the_lerp_budget() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 3, name="fc")
    attach(layer, 0, blend="lerp", alpha=0.0)
    attach(layer, 1, blend="lerp", alpha=0.0)
    layer.start_ramp(0, 0.7, 10)  # α is still 0, but 0.7 is promised
    with pytest.raises(LerpBudgetError, match="layer 'fc'"):
        layer.set_alpha(1, 0.4)
    with pytest.raises(LerpBudgetError, match="layer 'fc'"):
        layer.start_ramp(1, 0.4, 2)
    layer.start_ramp(1, 0.3, 2)
    for _ in range(10):
        layer.advance()
    assert alpha_of(layer, 0) + alpha_of(layer, 1) == pytest.approx(1.0)


def test_steps_in_state_counts_steps_and_resets_on_each_transition() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 3, name="fc")
    for _ in range(3):
        layer.advance()
    assert layer.layout.steps_in_state.tolist() == [0, 0, 0]  # dormant seeds do not age
    attach(layer, 0)
    layer.advance()
    layer.advance()
    attach(layer, 2)
    for _ in range(3):
        layer.advance()
    assert layer.layout.steps_in_state.tolist() == [5, 0, 3]
    layer.retire(0, "done", ramp_steps=10)
    assert layer.layout.steps_in_state.tolist() == [0, 0, 3]
    layer.advance()
    assert layer.layout.steps_in_state.tolist() == [1, 0, 4]


def test_retire_with_a_bad_ramp_leaves_the_seed_active() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    attach(layer, 0, alpha=0.5)
    with pytest.raises(ConfigError, match="ramp shape"):
        layer.retire(0, "x", ramp_steps=3, shape="bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ramp_steps"):
        layer.retire(0, "x", ramp_steps=-1)
    info = layer.seed_info(0)
    assert (info.state, info.alpha) == (S.ACTIVE, 0.5)
    assert layer.running_seeds() == (0,) and all(s.ramp is None for s in layer._slots)


def test_set_alpha_on_a_retiring_seed_is_refused_so_the_retirement_completes() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    attach(layer, 0, alpha=0.6)
    layer.retire(0, "going", ramp_steps=2)
    with pytest.raises(SeedStateError, match=r"cannot set α: seed 0 of layer 'fc' is RETIRING"):
        layer.set_alpha(0, 0.9)
    layer.advance()
    layer.advance()
    assert layer.seed_info(0).state is S.DORMANT


def test_retire_without_ramp_finishes_a_ramping_retirement_at_once() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    attach(layer, 0, alpha=0.6)
    layer.retire(0, "slowly", ramp_steps=100)
    layer.advance()
    layer.retire(0, "now")
    assert layer.seed_info(0).state is S.DORMANT
    assert alpha_of(layer, 0) == 0.0 and all(s.ramp is None for s in layer._slots)


# ================================================================ through MorphableModel
@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    registry = esper.LocalKernelRegistry()
    registry.compile("low_rank", nn.Linear(16, 32), tags=["lr16x32"])
    return registry


@pytest.fixture
def model(mlp: nn.Module, registry: esper.LocalKernelRegistry) -> Iterator[esper.MorphableModel]:
    morphable = esper.wrap(mlp, seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    morphable.load_kernel_sync("layer1", 0, "lr16x32", blend="lerp", alpha=0.0)
    yield morphable


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_ramp_seed_alpha_reaches_the_target_after_k_steps(
    model: esper.MorphableModel, shape: Any
) -> None:
    layer = model.layer("layer1")
    model.ramp_seed_alpha("layer1", 0, 0.6, 5, shape)
    reference = AlphaRamp(0.0, 0.6, 5, shape)
    for _ in range(5):
        model.step()
        assert alpha_of(layer, 0) == pytest.approx(reference.advance(), abs=1e-7)
    assert layer.seed_info(0).alpha == 0.6
    model.step()
    assert layer.seed_info(0).alpha == 0.6
    assert layer.seed_info(0).state is S.ACTIVE


def test_ramp_changes_the_output_as_alpha_rises(model: esper.MorphableModel) -> None:
    layer = model.layer("layer1")
    seed = layer.seed_module(0)
    assert seed is not None
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(3, 16)
    host, kernel = layer.base_layer(x), seed(x)
    model.ramp_seed_alpha("layer1", 0, 1.0, 4)
    for t in range(1, 5):
        model.step()
        a = t / 4
        torch.testing.assert_close(layer(x), (1 - a) * host + a * kernel)


def test_retire_seed_with_ramp_goes_to_zero_then_dormant(model: esper.MorphableModel) -> None:
    events: list[LifecycleEvent] = []
    model.add_listener(events.append)
    layer = model.layer("layer1")
    model.set_seed_alpha("layer1", 0, 0.8)
    model.retire_seed("layer1", 0, ramp_steps=4, reason="contribution below threshold")
    alphas = []
    for _ in range(3):
        model.step()
        assert layer.seed_info(0).state is S.RETIRING
        assert layer.running_seeds() == (0,)  # still blended in while it fades
        alphas.append(alpha_of(layer, 0))
    assert alphas == pytest.approx([0.6, 0.4, 0.2])
    model.step()
    assert layer.seed_info(0).state is S.DORMANT
    assert alpha_of(layer, 0) == 0.0
    assert layer.seed_module(0) is None
    assert [(e.to_state, e.reason) for e in events] == [
        (S.RETIRING, "contribution below threshold"),
        (S.RECYCLING, "retirement ramp finished"),
        (S.DORMANT, "slot recycled"),
    ]
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_ramp_seed_alpha_with_bad_arguments_changes_nothing(model: esper.MorphableModel) -> None:
    layer = model.layer("layer1")
    model.set_seed_alpha("layer1", 0, 0.3)
    for kwargs in ({"steps": 0}, {"steps": 3, "shape": "zigzag"}, {"steps": 3, "target": 1.5}):
        args = {"target": 0.5, "shape": "linear"} | kwargs
        with pytest.raises((ConfigError, AlphaRangeError)):
            model.ramp_seed_alpha("layer1", 0, args["target"], args["steps"], args["shape"])
    model.step()
    assert layer.seed_info(0).alpha == 0.3 and all(s.ramp is None for s in layer._slots)
    with pytest.raises(SeedStateError, match=r"seed 1 of layer 'layer1' is DORMANT"):
        model.ramp_seed_alpha("layer1", 1, 0.5, 3)

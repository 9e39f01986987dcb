"""KasminaLayer: the blend, the dormant fast path, gradients, error isolation and bad input.

Most tests drive the layer directly (begin_load → mark_loading → attach with a plain module as the
kernel); the tests that need the executor's checks load real kernel artifacts through esper.wrap.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import esper
from esper.exceptions import (
    AlphaRangeError,
    ConfigError,
    KernelDtypeError,
    KernelShapeError,
    LerpBudgetError,
    SeedIndexError,
    SeedStateError,
    UnknownKernelError,
    UnknownLayerError,
    UnsupportedHostError,
)
from esper.kasmina import BlendMode, KasminaLayer, LifecycleEvent, SeedInfo, SeedState
from esper.kasmina.state import SeedSlot
from esper.kernels import KernelArtifact, KernelMeta, digest_of, serialize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
KID = "krn_" + "ab" * 12
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- kernels used as seeds
class Raising(nn.Module):
    """Raises on every call (attached directly, so no export has to trace it)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")


class RaiseOnBatch7(nn.Module):
    """Passes the executor's probe (batch 3) and raises on a batch of 7; TorchScript-able."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            raise RuntimeError("kernel exploded on batch 7")
        return self.lin(x)


class Scaled(nn.Module):
    """A linear kernel whose output is multiplied by a constant (NaN or inf makes it non-finite)."""

    def __init__(self, d_in: int, d_out: int, factor: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.factor


class Float64Out(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).double()


class FixedBatch(nn.Module):
    """Right shape for the executor's probe (batch 3), wrong for any other batch."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[:1].expand(3, -1)


# ----------------------------------------------------------------------------- helpers
def attach(
    layer: KasminaLayer,
    seed: int,
    module: nn.Module,
    *,
    blend: str = "add",
    alpha: float = 0.0,
    grad_isolation: bool = False,
) -> None:
    layer.begin_load(seed, "test")
    layer.mark_loading(seed, KID)
    layer.attach(seed, module, blend=BlendMode(blend), alpha=alpha, grad_isolation=grad_isolation)


def linear_layer(
    d_in: int = 6, d_out: int = 5, seeds: int = 4, **kw: Any
) -> tuple[KasminaLayer, nn.Linear]:
    host = nn.Linear(d_in, d_out)
    return KasminaLayer(host, seeds, name="blk.fc", **kw), host


def events_of(layer: KasminaLayer) -> list[LifecycleEvent]:
    events: list[LifecycleEvent] = []
    layer.lifecycle.listeners.append(events.append)
    return events


@dataclass
class Snapshot:
    buffers: dict[str, torch.Tensor]
    infos: list[SeedInfo]
    running: tuple[tuple[int, ...], tuple[int, ...]]
    modules: list[int]
    ramps: dict[int, dict[str, Any]]


def snapshot(layer: KasminaLayer) -> Snapshot:
    return Snapshot(
        buffers={k: v.clone() for k, v in layer.layout.state_dict().items()},
        infos=[layer.seed_info(i) for i in range(layer.num_seeds)],
        running=(layer._running_lerp, layer._running_add),
        modules=[id(layer.seed_module(i)) for i in range(layer.num_seeds)],
        ramps={i: s.ramp.to_dict() for i, s in enumerate(layer._slots) if s.ramp is not None},
    )


def assert_unchanged(layer: KasminaLayer, before: Snapshot) -> None:
    after = snapshot(layer)
    assert after.buffers.keys() == before.buffers.keys()
    for key, value in before.buffers.items():
        torch.testing.assert_close(after.buffers[key], value, rtol=0, atol=0, equal_nan=True)
    assert after.infos == before.infos
    assert after.running == before.running
    assert after.modules == before.modules
    assert after.ramps == before.ramps


def publish(
    registry: esper.LocalKernelRegistry, module: nn.Module, host: nn.Module, fmt: str
) -> KernelMeta:
    """Serialize any module as a kernel for `host` and publish it; returns its metadata."""
    signature = esper.HostSignature.of(host)
    data = serialize(module, signature, fmt)  # type: ignore[arg-type]
    meta = KernelMeta(
        kernel_id="krn_" + secrets.token_hex(12),
        name=type(module).__name__,
        format=fmt,  # type: ignore[arg-type]
        host=signature,
        digest=digest_of(data),
        size_bytes=len(data),
    )
    registry.publish(KernelArtifact(meta, data))
    return meta


class OpLog(TorchDispatchMode):
    """Records every aten op dispatched inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_of(fn: Callable[[], object]) -> list[str]:
    with OpLog() as log:
        fn()
    return log.ops


# ------------------------------------------------------------------ hypothesis strategies
@st.composite
def conv_hosts(draw: st.DrawFn) -> tuple[nn.Conv2d, torch.Tensor]:
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding: Any
    if stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    conv = nn.Conv2d(
        c_in, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    h = dilation[0] * (kh - 1) + 1 + draw(st.integers(0, 4))
    w = dilation[1] * (kw - 1) + 1 + draw(st.integers(0, 4))
    x = torch.randn(draw(st.integers(1, 3)), c_in, h, w)
    return conv, x


def same_geometry(conv: nn.Conv2d) -> nn.Conv2d:
    """A kernel for a conv host: a conv of the same geometry with its own (nonzero) weights."""
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )


# ============================================================================ construction
def test_constructor_rejects_bad_config() -> None:
    with pytest.raises(ConfigError, match="num_seeds"):
        KasminaLayer(nn.Linear(2, 2), 0)
    with pytest.raises(ConfigError, match="error_threshold"):
        KasminaLayer(nn.Linear(2, 2), 2, error_threshold=0)
    with pytest.raises(UnsupportedHostError, match="ReLU"):
        KasminaLayer(nn.ReLU())


def test_uninitialized_lazy_host_is_refused_with_a_clear_error() -> None:
    with pytest.raises(UnsupportedHostError, match="uninitialized LazyLinear"):
        KasminaLayer(nn.LazyLinear(4))
    lazy = nn.LazyLinear(4)
    lazy(torch.randn(2, 3))
    assert KasminaLayer(lazy).signature.in_features == 3


def test_new_layer_has_every_seed_dormant_and_nothing_running() -> None:
    layer, _ = linear_layer(seeds=3)
    assert layer.free_seeds() == [0, 1, 2]
    assert layer.running_seeds() == ()
    assert [layer.seed_info(i).state for i in range(3)] == [SeedState.DORMANT] * 3
    assert torch.equal(layer.layout.state, torch.zeros(3, dtype=torch.int8))
    assert torch.isnan(layer.layout.contribution).all()  # missing reads as missing


# ========================================================================= the dormant path
@PROPERTY
@given(
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    bias=st.booleans(),
)
def test_dormant_linear_is_bit_identical_to_host(
    d_in: int, d_out: int, lead: list[int], bias: bool
) -> None:
    host = nn.Linear(d_in, d_out, bias=bias)
    layer = KasminaLayer(host, 3, name="fc")
    x = torch.randn(*lead, d_in)
    assert torch.equal(layer(x), host(x))


@PROPERTY
@given(case=conv_hosts())
def test_dormant_conv_is_bit_identical_to_host(case: tuple[nn.Conv2d, torch.Tensor]) -> None:
    conv, x = case
    layer = KasminaLayer(conv, 2, name="conv")
    assert torch.equal(layer(x), conv(x))


def test_dormant_forward_dispatches_exactly_the_host_ops() -> None:
    layer, host = linear_layer()
    x = torch.randn(4, 6)
    bare = ops_of(lambda: host(x))
    assert bare  # the log sees the host's ops at all
    assert ops_of(lambda: layer(x)) == bare
    # Seeds that are mid-load or were recycled still take the fast path.
    layer.begin_load(0, "test")
    layer.mark_loading(0, KID)
    attach(layer, 1, nn.Linear(6, 5), alpha=0.5)
    layer.retire(1, "done")
    assert layer.seed_info(1).state is SeedState.DORMANT
    assert ops_of(lambda: layer(x)) == bare


def test_dormant_conv_forward_dispatches_exactly_the_host_ops() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = KasminaLayer(conv, 2, name="conv")
    x = torch.randn(2, 3, 8, 8)
    assert ops_of(lambda: layer(x)) == ops_of(lambda: conv(x))


def test_active_forward_off_the_cpu_never_reads_a_tensor_back_to_python() -> None:
    """On the CPU the non-finite check reads its one scalar (free there). On any other device it
    must stay on the device: `meta` holds no data, so a read back to Python would raise."""
    layer, _ = linear_layer()
    attach(layer, 0, nn.Linear(6, 5), blend="lerp", alpha=0.3)
    attach(layer, 1, nn.Linear(6, 5), blend="add", alpha=0.6)
    layer = layer.to("meta")
    x = torch.randn(4, 6, device="meta")
    ops = ops_of(lambda: layer(x))
    assert len(ops) > len(ops_of(lambda: layer.base_layer(x)))
    assert "aten.where.self" in ops
    assert not [op for op in ops if "_local_scalar_dense" in op or "is_nonzero" in op]
    assert layer.running_seeds() == (0, 1)


# ====================================================================== the blend formula
@PROPERTY
@given(
    d_in=st.integers(1, 8),
    d_out=st.integers(1, 8),
    batch=st.integers(1, 4),
    lerp_seed=st.booleans(),
)
def test_add_seed_at_alpha_zero_is_exactly_the_host(
    d_in: int, d_out: int, batch: int, lerp_seed: bool
) -> None:
    layer, host = linear_layer(d_in, d_out)
    attach(layer, 0, nn.Linear(d_in, d_out), blend="add", alpha=0.0)
    if lerp_seed:
        attach(layer, 2, nn.Linear(d_in, d_out), blend="lerp", alpha=0.0)
    x = torch.randn(batch, d_in)
    assert torch.equal(layer(x), host(x))


@PROPERTY
@given(case=conv_hosts())
def test_conv_add_seed_at_alpha_zero_is_exactly_the_host(
    case: tuple[nn.Conv2d, torch.Tensor],
) -> None:
    conv, x = case
    layer = KasminaLayer(conv, 2, name="conv")
    attach(layer, 1, same_geometry(conv), alpha=0.0)
    assert torch.equal(layer(x), conv(x))


@PROPERTY
@given(d_in=st.integers(1, 8), d_out=st.integers(1, 8), batch=st.integers(1, 4))
def test_lerp_seed_at_alpha_one_is_exactly_the_kernel(d_in: int, d_out: int, batch: int) -> None:
    layer, host = linear_layer(d_in, d_out)
    kernel = nn.Linear(d_in, d_out)
    attach(layer, 3, kernel, blend="lerp", alpha=1.0)
    x = torch.randn(batch, d_in)
    out = layer(x)
    assert torch.equal(out, kernel(x))
    assert not torch.equal(out, host(x))


@PROPERTY
@given(case=conv_hosts())
def test_conv_lerp_seed_at_alpha_one_is_exactly_the_kernel(
    case: tuple[nn.Conv2d, torch.Tensor],
) -> None:
    conv, x = case
    layer = KasminaLayer(conv, 2, name="conv")
    kernel = same_geometry(conv)
    attach(layer, 0, kernel, blend="lerp", alpha=1.0)
    assert torch.equal(layer(x), kernel(x))


@PROPERTY
@given(
    modes=st.lists(st.sampled_from(["add", "lerp"]), min_size=1, max_size=4),
    raw_alphas=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    batch=st.integers(1, 4),
)
def test_blend_formula_with_several_seeds_of_both_modes(
    modes: list[str], raw_alphas: list[float], batch: int
) -> None:
    layer, host = linear_layer(5, 3)
    n_lerp = modes.count("lerp")
    alphas = [a / n_lerp if m == "lerp" else a for m, a in zip(modes, raw_alphas, strict=False)]
    kernels = [nn.Linear(5, 3) for _ in modes]
    for i, (mode, alpha, kernel) in enumerate(zip(modes, alphas, kernels, strict=True)):
        attach(layer, i, kernel, blend=mode, alpha=alpha)
    x = torch.randn(batch, 5)
    with torch.no_grad():
        h = host(x)
        lerp_sum = sum(a for m, a in zip(modes, alphas, strict=True) if m == "lerp")
        expected = (1 - lerp_sum) * h
        for alpha, kernel in zip(alphas, kernels, strict=True):
            expected = expected + alpha * kernel(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_blend_matches_the_formula_for_a_conv_host_with_mixed_seeds() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    layer = KasminaLayer(conv, 3, name="conv")
    k0, k1, k2 = same_geometry(conv), same_geometry(conv), same_geometry(conv)
    attach(layer, 0, k0, blend="lerp", alpha=0.25)
    attach(layer, 1, k1, blend="lerp", alpha=0.5)
    attach(layer, 2, k2, blend="add", alpha=0.75)
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        expected = 0.25 * conv(x) + 0.25 * k0(x) + 0.5 * k1(x) + 0.75 * k2(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_linear_host_with_3d_input_folds_leading_dims_for_the_kernel() -> None:
    layer, host = linear_layer(6, 5)
    seen: list[tuple[int, ...]] = []

    class Recording(nn.Linear):  # seeds run through forward, not __call__: hooks would not fire
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return super().forward(x)

    kernel = Recording(6, 5)
    attach(layer, 0, kernel, blend="add", alpha=0.5)
    x = torch.randn(2, 7, 6)
    out = layer(x)
    assert out.shape == (2, 7, 5)
    assert seen == [(14, 6)]  # the kernel saw [batch*T, D]
    torch.testing.assert_close(out, host(x) + 0.5 * kernel(x))
    assert layer.seed_info(0).last_error is None


def test_linear_host_with_1d_input_works_with_a_seed() -> None:
    layer, _ = linear_layer(6, 5)
    kernel = nn.Linear(6, 5)
    attach(layer, 0, kernel, blend="lerp", alpha=1.0)
    x = torch.randn(6)
    assert torch.equal(layer(x), kernel(x))


def test_conv_host_with_unbatched_input_works_with_a_batch_only_kernel() -> None:
    class BatchedOnly(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.dim() == 4, "kernels are exported for [B, C, H, W]"
            return super().forward(x)

    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = KasminaLayer(conv, 2, name="conv", error_threshold=1)
    kernel = BatchedOnly(3, 4, 3, padding=1)
    attach(layer, 0, kernel, blend="lerp", alpha=1.0)
    x = torch.randn(3, 6, 6)
    out = layer(x)
    assert layer.seed_info(0).state is SeedState.ACTIVE, layer.seed_info(0).last_error
    torch.testing.assert_close(out, kernel(x.unsqueeze(0)).squeeze(0))


def test_alpha_changes_are_in_place_on_the_same_buffer() -> None:
    layer, _ = linear_layer()
    buffer = layer.layout.alpha
    ptr = buffer.data_ptr()
    attach(layer, 0, nn.Linear(6, 5), alpha=0.2)
    layer.set_alpha(0, 0.9)
    assert layer.layout.alpha is buffer and buffer.data_ptr() == ptr
    assert buffer[0].item() == pytest.approx(0.9)
    assert layer.state_dict()["layout.alpha"][0].item() == pytest.approx(0.9)


# ============================================================================= gradients
def _isolation_setup(isolate: bool) -> tuple[nn.Linear, KasminaLayer, nn.Linear]:
    upstream = nn.Linear(4, 6)
    layer, _ = linear_layer(6, 5)
    kernel = nn.Linear(6, 5)
    # lerp at α=1: the host's weight is 0, so every gradient upstream comes from the seed branch.
    attach(layer, 0, kernel, blend="lerp", alpha=1.0, grad_isolation=isolate)
    layer(upstream(torch.randn(3, 4))).pow(2).sum().backward()
    return upstream, layer, kernel


def test_grad_isolation_detaches_the_seed_input() -> None:
    upstream, layer, kernel = _isolation_setup(isolate=True)
    assert layer.seed_info(0).grad_isolation is True
    assert upstream.weight.grad is not None
    assert torch.count_nonzero(upstream.weight.grad) == 0
    assert kernel.weight.grad is not None and torch.count_nonzero(kernel.weight.grad) > 0


def test_without_grad_isolation_upstream_learns_through_the_seed() -> None:
    upstream, layer, kernel = _isolation_setup(isolate=False)
    assert layer.seed_info(0).grad_isolation is False
    assert upstream.weight.grad is not None and torch.count_nonzero(upstream.weight.grad) > 0
    assert kernel.weight.grad is not None and torch.count_nonzero(kernel.weight.grad) > 0


def test_isolated_add_seed_leaves_upstream_grad_equal_to_the_host_alone() -> None:
    torch.manual_seed(1)
    upstream = nn.Linear(4, 6)
    layer, host = linear_layer(6, 5)
    attach(layer, 0, nn.Linear(6, 5), blend="add", alpha=0.7, grad_isolation=True)
    x = torch.randn(3, 4)
    layer(upstream(x)).sum().backward()  # d(sum)/d(host input) does not depend on the seed output
    with_seed = upstream.weight.grad.clone()  # type: ignore[union-attr]
    upstream.zero_grad()
    host(upstream(x)).sum().backward()
    torch.testing.assert_close(with_seed, upstream.weight.grad)


def test_seed_gets_no_gradient_at_alpha_zero_and_one_above_it() -> None:
    layer, _ = linear_layer(6, 5)
    kernel = nn.Linear(6, 5)
    attach(layer, 0, kernel, blend="add", alpha=0.0)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    assert kernel.weight.grad is not None and torch.count_nonzero(kernel.weight.grad) == 0
    kernel.zero_grad()
    layer.set_alpha(0, 0.5)
    layer(x).sum().backward()
    assert kernel.weight.grad is not None and torch.count_nonzero(kernel.weight.grad) > 0


def test_an_optimizer_step_on_seed_params_changes_the_output() -> None:
    layer, host = linear_layer(6, 5)
    attach(layer, 0, nn.Linear(6, 5), blend="add", alpha=0.5)
    module = layer.seed_module(0)
    assert module is not None
    host_before = [p.detach().clone() for p in host.parameters()]
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    before = layer(x).detach()
    layer(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(layer(x), before)
    assert all(torch.equal(a, b) for a, b in zip(host_before, host.parameters(), strict=True))


def test_backward_uses_the_alpha_of_the_forward_even_if_alpha_changes_before_it() -> None:
    layer, _ = linear_layer(6, 5)
    kernel = nn.Linear(6, 5)
    attach(layer, 0, kernel, blend="add", alpha=0.5)
    x = torch.randn(3, 6)
    out = layer(x)
    layer.set_alpha(0, 0.25)  # e.g. a ramp step between forward and backward
    out.sum().backward()
    assert kernel.bias.grad is not None
    torch.testing.assert_close(kernel.bias.grad, torch.full((5,), 0.5 * 3))


# ===================================================== error isolation and circuit breaker
@pytest.mark.parametrize("blend", ["add", "lerp"])
def test_raising_kernel_falls_back_and_trips_the_breaker_at_the_threshold(blend: str) -> None:
    layer, host = linear_layer(error_threshold=3)
    events = events_of(layer)
    attach(layer, 1, Raising(6, 5), blend=blend, alpha=0.5)
    events.clear()
    x = torch.randn(4, 6)
    for count in (1, 2):
        torch.testing.assert_close(layer(x), host(x), rtol=0, atol=0)
        info = layer.seed_info(1)
        assert info.state is SeedState.ACTIVE
        assert info.last_error == "RuntimeError: kernel exploded"
        assert int(layer.layout.error_count[1]) == count
    assert events == []
    torch.testing.assert_close(layer(x), host(x), rtol=0, atol=0)  # third error trips
    assert layer.seed_info(1).state is SeedState.DORMANT
    assert layer.seed_module(1) is None and layer.running_seeds() == ()
    assert [(e.from_state, e.to_state) for e in events] == [
        (SeedState.ACTIVE, SeedState.RETIRING),
        (SeedState.RETIRING, SeedState.RECYCLING),
        (SeedState.RECYCLING, SeedState.DORMANT),
    ]
    assert all(e.kernel_id == KID for e in events)
    for event in events[:2]:
        assert "circuit breaker" in event.reason and "kernel exploded" in event.reason
    assert torch.equal(layer(x), host(x))  # and it is dormant again


def test_a_failing_seed_does_not_disturb_a_healthy_one() -> None:
    layer, host = linear_layer(error_threshold=2)
    good = nn.Linear(6, 5)
    attach(layer, 0, good, blend="add", alpha=0.5)
    attach(layer, 1, Raising(6, 5), blend="add", alpha=0.5)
    x = torch.randn(4, 6)
    for _ in range(3):
        torch.testing.assert_close(layer(x), host(x) + 0.5 * good(x))
    assert layer.seed_info(0).state is SeedState.ACTIVE
    assert layer.seed_info(1).state is SeedState.DORMANT


def test_backward_works_when_the_breaker_trips_inside_the_forward() -> None:
    layer, _ = linear_layer(error_threshold=1)
    kernel = nn.Linear(6, 5)
    attach(layer, 0, kernel, blend="lerp", alpha=0.5)
    attach(layer, 1, Raising(6, 5), blend="add", alpha=0.5)
    x = torch.randn(3, 6, requires_grad=True)
    out = layer(x)  # seed 1 raises, trips, and its α is zeroed while autograd holds α
    assert layer.seed_info(1).state is SeedState.DORMANT
    out.sum().backward()
    assert kernel.bias.grad is not None
    torch.testing.assert_close(kernel.bias.grad, torch.full((5,), 0.5 * 3))


def test_lerp_seed_tripping_inside_the_forward_still_yields_the_host_output() -> None:
    layer, host = linear_layer(error_threshold=1)
    attach(layer, 0, Raising(6, 5), blend="lerp", alpha=0.3)
    x = torch.randn(3, 6)
    out = layer(x)
    assert layer.seed_info(0).state is SeedState.DORMANT
    torch.testing.assert_close(out, host(x))


@pytest.mark.parametrize(
    ("kernel", "error"),
    [
        (FixedBatch(6, 5), "KernelShapeError"),
        (Float64Out(6, 5), "KernelDtypeError"),
    ],
)
def test_kernel_output_of_wrong_shape_or_dtype_at_runtime_is_an_isolated_error(
    kernel: nn.Module, error: str
) -> None:
    layer, host = linear_layer(error_threshold=2)
    attach(layer, 0, kernel, blend="lerp", alpha=0.5)
    x = torch.randn(4, 6)
    out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, host(x))
    last_error = layer.seed_info(0).last_error
    assert last_error is not None and last_error.startswith(error)
    layer(x)
    assert layer.seed_info(0).state is SeedState.DORMANT


@pytest.mark.parametrize("factor", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("blend", ["add", "lerp"])
def test_nonfinite_kernel_output_is_replaced_by_the_fallback(blend: str, factor: float) -> None:
    layer, host = linear_layer(error_threshold=3)
    events = events_of(layer)
    attach(layer, 0, Scaled(6, 5, factor), blend=blend, alpha=0.5)
    events.clear()
    x = torch.randn(4, 6)
    for count in (1, 2):
        out = layer(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, host(x), rtol=0, atol=0)
        assert int(layer.layout.error_count[0]) == count
        assert layer.seed_info(0).state is SeedState.ACTIVE
    # On the CPU the check is read in Python: the third error trips the breaker in that forward.
    torch.testing.assert_close(layer(x), host(x), rtol=0, atol=0)
    assert layer.seed_info(0).state is SeedState.DORMANT
    assert "circuit breaker" in events[0].reason and "non-finite" in events[0].reason


def test_poll_health_trips_on_errors_counted_on_the_device() -> None:
    """Off the CPU, non-finite outputs are counted in the layout buffer without a sync; the
    breaker trips when step()/poll_health() reads the counts."""
    layer, _ = linear_layer(error_threshold=3)
    attach(layer, 0, nn.Linear(6, 5), alpha=0.5)
    layer.layout.error_count[0] = 2
    layer.poll_health()
    assert layer.seed_info(0).state is SeedState.ACTIVE
    layer.layout.error_count[0] += 1
    layer.poll_health()
    assert layer.seed_info(0).state is SeedState.DORMANT


def test_poll_health_below_the_threshold_keeps_the_seed() -> None:
    layer, _ = linear_layer(error_threshold=3)
    attach(layer, 0, Scaled(6, 5, math.nan), alpha=0.5)
    layer(torch.randn(2, 6))
    layer(torch.randn(2, 6))
    layer.poll_health()
    assert layer.seed_info(0).state is SeedState.ACTIVE
    layer(torch.randn(2, 6))
    layer.poll_health()
    assert layer.seed_info(0).state is SeedState.DORMANT


def test_nonfinite_guard_can_be_switched_off() -> None:
    layer, _ = linear_layer(guard_nonfinite=False)
    attach(layer, 0, Scaled(6, 5, math.nan), alpha=0.5)
    assert torch.isnan(layer(torch.randn(2, 6))).all()
    assert int(layer.layout.error_count[0]) == 0


def test_reloading_a_slot_clears_its_error_history() -> None:
    layer, _ = linear_layer(error_threshold=1)
    attach(layer, 0, Raising(6, 5), alpha=0.5)
    layer(torch.randn(2, 6))
    assert layer.seed_info(0).state is SeedState.DORMANT
    attach(layer, 0, nn.Linear(6, 5), alpha=0.5)
    assert layer.seed_info(0).last_error is None
    assert int(layer.layout.error_count[0]) == 0
    assert torch.isnan(layer.layout.contribution[0])


# ========================================================================== bad input
@pytest.fixture
def busy_layer() -> KasminaLayer:
    """A layer with some state worth preserving: an aged lerp seed, an add seed with an error."""
    layer = KasminaLayer(nn.Linear(6, 5), 4, name="blk.fc", error_threshold=5)
    attach(layer, 0, nn.Linear(6, 5), blend="lerp", alpha=0.6)
    attach(layer, 2, Scaled(6, 5, math.nan), blend="add", alpha=0.3)
    layer(torch.randn(2, 6))
    layer.advance()
    layer.advance()
    layer.start_ramp(0, 0.7, 4)
    layer.advance()
    return layer


@pytest.mark.parametrize("seed", [-1, 4, 99, True, 1.0, "0", None])
def test_bad_seed_index_raises_and_changes_nothing(busy_layer: KasminaLayer, seed: Any) -> None:
    before = snapshot(busy_layer)
    calls: list[Callable[[], object]] = [
        lambda: busy_layer.set_alpha(seed, 0.1),
        lambda: busy_layer.start_ramp(seed, 0.1, 3),
        lambda: busy_layer.retire(seed, "x"),
        lambda: busy_layer.begin_load(seed, "x"),
        lambda: busy_layer.mark_loading(seed, KID),
        lambda: busy_layer.fail_load(seed, "x"),
        lambda: busy_layer.attach(seed, nn.Linear(6, 5)),
        lambda: busy_layer.seed_info(seed),
        lambda: busy_layer.seed_module(seed),
        lambda: busy_layer.lifecycle.transition(seed, SeedState.ALLOCATED, "x"),
    ]
    for call in calls:
        with pytest.raises(SeedIndexError, match=r"seed index .* layer 'blk\.fc'"):
            call()
    assert_unchanged(busy_layer, before)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 2, math.nan, math.inf, -math.inf, True, "0.5"])
def test_alpha_outside_unit_interval_raises_and_changes_nothing(
    busy_layer: KasminaLayer, alpha: Any
) -> None:
    before = snapshot(busy_layer)
    for seed in (0, 2):
        with pytest.raises(AlphaRangeError, match=rf"seed {seed} of layer 'blk\.fc'"):
            busy_layer.set_alpha(seed, alpha)
        with pytest.raises(AlphaRangeError, match=rf"seed {seed} of layer 'blk\.fc'"):
            busy_layer.start_ramp(seed, alpha, 3)
    assert_unchanged(busy_layer, before)


def test_lerp_budget_over_one_raises_and_changes_nothing(busy_layer: KasminaLayer) -> None:
    attach(busy_layer, 1, nn.Linear(6, 5), blend="lerp", alpha=0.2)
    before = snapshot(busy_layer)
    # seed 0 holds 0.6 and ramps to 0.7: the budget counts the ramp's target.
    with pytest.raises(LerpBudgetError, match=r"layer 'blk\.fc'.*seed 1"):
        busy_layer.set_alpha(1, 0.31)
    with pytest.raises(LerpBudgetError, match=r"layer 'blk\.fc'"):
        busy_layer.start_ramp(1, 0.5, 2)
    with pytest.raises(LerpBudgetError, match=r"layer 'blk\.fc'"):
        busy_layer.set_alpha(0, 0.81)
    assert_unchanged(busy_layer, before)
    busy_layer.set_alpha(1, 0.3)  # exactly 1 is allowed
    assert busy_layer.seed_info(1).alpha == 0.3


def test_loading_a_lerp_seed_past_the_budget_is_refused(busy_layer: KasminaLayer) -> None:
    before = snapshot(busy_layer)
    busy_layer.begin_load(3, "test")
    busy_layer.mark_loading(3, KID)
    with pytest.raises(LerpBudgetError, match=r"layer 'blk\.fc'"):
        busy_layer.attach(3, nn.Linear(6, 5), blend=BlendMode.LERP, alpha=0.5)
    busy_layer.fail_load(3, "budget")
    assert_unchanged(busy_layer, before)


def test_set_alpha_on_a_dormant_seed_raises_and_changes_nothing(busy_layer: KasminaLayer) -> None:
    before = snapshot(busy_layer)
    with pytest.raises(SeedStateError, match=r"seed 1 of layer 'blk\.fc' is DORMANT"):
        busy_layer.set_alpha(1, 0.5)
    with pytest.raises(SeedStateError, match=r"seed 1 of layer 'blk\.fc' is DORMANT"):
        busy_layer.start_ramp(1, 0.5, 3)
    assert_unchanged(busy_layer, before)


def test_loading_into_an_occupied_slot_raises_and_changes_nothing(
    busy_layer: KasminaLayer,
) -> None:
    before = snapshot(busy_layer)
    with pytest.raises(
        SeedStateError, match=rf"seed 0 of layer 'blk\.fc' is ACTIVE \(kernel {KID}"
    ):
        busy_layer.begin_load(0, "again")
    assert_unchanged(busy_layer, before)


def test_retiring_a_dormant_seed_raises_and_changes_nothing(busy_layer: KasminaLayer) -> None:
    before = snapshot(busy_layer)
    with pytest.raises(
        SeedStateError, match=r"cannot retire: seed 3 of layer 'blk\.fc' is DORMANT"
    ):
        busy_layer.retire(3, "nothing there")
    assert_unchanged(busy_layer, before)


def test_attach_outside_loading_raises_and_changes_nothing(busy_layer: KasminaLayer) -> None:
    before = snapshot(busy_layer)
    for seed in (0, 1):
        with pytest.raises(SeedStateError, match=rf"cannot attach: seed {seed} of layer 'blk\.fc'"):
            busy_layer.attach(seed, nn.Linear(6, 5))
    assert_unchanged(busy_layer, before)


# ================================================================ through esper.wrap
@pytest.fixture(scope="module")
def kernels() -> dict[str, Any]:
    """Kernels for TinyMLP.layer1 (16 → 32), published once for the whole module."""
    host = nn.Linear(16, 32)  # the geometry of the conftest TinyMLP's layer1
    registry = esper.LocalKernelRegistry()
    return {
        "registry": registry,
        "low_rank": registry.compile("low_rank", host, tags=["lr_layer1"]).kernel_id,
        "raises": publish(registry, RaiseOnBatch7(16, 32), host, "torchscript").kernel_id,
        "nan": publish(registry, Scaled(16, 32, math.nan), host, "torchscript").kernel_id,
        "wrong_shape": publish(registry, nn.Linear(16, 31), host, "torchscript").kernel_id,
        "float64": publish(registry, Float64Out(16, 32), host, "export").kernel_id,
    }


@pytest.fixture
def wrapped(
    mlp: nn.Module, kernels: dict[str, Any]
) -> Iterator[tuple[esper.MorphableModel, list[LifecycleEvent]]]:
    # The TorchScript kernels above are this module's own: it trusts them (nobody vouches).
    cache = esper.KernelCache([kernels["registry"]], trust_torchscript=True)
    model = esper.wrap(mlp, seeds_per_layer=4, kernels=cache)
    events: list[LifecycleEvent] = []
    model.add_listener(events.append)
    yield model, events


async def test_lerp_kernel_at_alpha_one_gives_the_trained_kernel_output(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, _ = wrapped
    info = await model.load_kernel("layer1", 0, kernels["low_rank"], blend="lerp", alpha=1.0)
    assert info.state is SeedState.ACTIVE and info.blend is BlendMode.LERP
    layer = model.layer("layer1")
    seed = layer.seed_module(0)
    assert seed is not None
    x = torch.randn(5, 16)
    assert torch.count_nonzero(layer(x)) == 0  # function-preserving init: last layer zero
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(torch.randn_like(p))
    out = layer(x)
    assert torch.count_nonzero(out) > 0
    assert torch.equal(out, seed(x))


async def test_add_kernel_at_alpha_zero_keeps_the_model_output_exactly(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, _ = wrapped
    x = torch.randn(5, 16)
    before = model(x)
    await model.load_kernel("layer1", 1, "lr_layer1", blend="add", alpha=0.0)
    seed = model.layer("layer1").seed_module(1)
    assert seed is not None
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(model(x), before)


async def test_loaded_seed_trains_and_changes_the_output(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, _ = wrapped
    host_params = [p.detach().clone() for p in model.host_parameters()]
    opt = torch.optim.SGD(model.host_parameters(), lr=0.0)
    model.attach_optimizer(opt, lr=0.05)
    await model.load_kernel("layer1", 0, kernels["low_rank"], alpha=0.5)
    x, target = torch.randn(8, 16), torch.randn(8, 4)
    before = model(x).detach()
    nn.functional.mse_loss(model(x), target).backward()
    grads = [p.grad for p in model.seed_parameters("layer1", 0)]
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    opt.step()
    assert not torch.allclose(model(x), before)
    assert all(torch.equal(a, b) for a, b in zip(host_params, model.host_parameters(), strict=True))


async def test_torchscript_kernel_that_raises_trips_the_breaker_via_wrap(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, events = wrapped
    await model.load_kernel("layer1", 2, kernels["raises"], blend="lerp", alpha=0.25)
    layer = model.layer("layer1")
    events.clear()
    x7 = torch.randn(7, 16)
    inner: Any = model.model
    with torch.no_grad():
        expected = inner.layer2(inner.act(layer.base_layer(x7)))
        x4 = torch.randn(4, 16)
        assert not torch.allclose(layer(x4), layer.base_layer(x4))  # other batches: it runs
    for _ in range(layer.error_threshold):
        torch.testing.assert_close(model(x7), expected)
    assert layer.seed_info(2).state is SeedState.DORMANT
    assert [e.to_state for e in events] == [
        SeedState.RETIRING,
        SeedState.RECYCLING,
        SeedState.DORMANT,
    ]
    assert "circuit breaker" in events[0].reason
    assert "kernel exploded on batch 7" in events[0].reason
    assert all(e.layer == "layer1" and e.seed == 2 for e in events)


async def test_nan_kernel_is_retired_by_morphable_step(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, events = wrapped
    opt = torch.optim.SGD(model.host_parameters(), lr=0.0)
    model.attach_optimizer(opt)
    await model.load_kernel("layer1", 0, kernels["nan"], alpha=0.5)
    assert any(str(g.get("name")) == "seed:layer1:0" for g in opt.param_groups)
    threshold = model.layer("layer1").error_threshold
    for step in range(threshold):
        assert torch.isfinite(model(torch.randn(4, 16))).all()
        model.step()
        expected = SeedState.ACTIVE if step < threshold - 1 else SeedState.DORMANT
        assert model.layer("layer1").seed_info(0).state is expected
    assert "circuit breaker" in events[-3].reason and "non-finite" in events[-3].reason
    assert not any(str(g.get("name")) == "seed:layer1:0" for g in opt.param_groups)


@pytest.mark.parametrize(
    ("kernel", "error"),
    [("wrong_shape", KernelShapeError), ("float64", KernelDtypeError)],
)
async def test_mismatched_kernel_is_refused_at_load_and_changes_nothing(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]],
    kernels: dict[str, Any],
    kernel: str,
    error: type[Exception],
) -> None:
    model, events = wrapped
    await model.load_kernel("layer1", 0, kernels["low_rank"], alpha=0.4)
    layer = model.layer("layer1")
    before = snapshot(layer)
    events.clear()
    with pytest.raises(error, match=rf"kernel {kernels[kernel]} in layer 'layer1'"):
        await model.load_kernel("layer1", 1, kernels[kernel], alpha=0.1)
    assert_unchanged(layer, before)
    assert events[-1].to_state is SeedState.DORMANT
    assert events[-1].reason.startswith(f"load failed: {error.__name__}")


async def test_loading_into_an_occupied_slot_via_wrap_changes_nothing(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, events = wrapped
    await model.load_kernel("layer1", 0, kernels["low_rank"], alpha=0.4)
    layer = model.layer("layer1")
    before = snapshot(layer)
    events.clear()
    with pytest.raises(SeedStateError, match=r"seed 0 of layer 'layer1' is ACTIVE"):
        await model.load_kernel("layer1", 0, kernels["low_rank"], alpha=0.1)
    assert_unchanged(layer, before)
    assert events == []


async def test_unknown_kernel_returns_the_slot_to_dormant(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]],
) -> None:
    model, events = wrapped
    layer = model.layer("layer1")
    before = snapshot(layer)
    with pytest.raises(UnknownKernelError, match="no_such_kernel"):
        await model.load_kernel("layer1", 0, "no_such_kernel")
    assert_unchanged(layer, before)
    assert [(e.from_state, e.to_state) for e in events] == [
        (SeedState.DORMANT, SeedState.ALLOCATED),
        (SeedState.ALLOCATED, SeedState.DORMANT),
    ]


async def test_unknown_layer_name_raises_and_changes_nothing(
    wrapped: tuple[esper.MorphableModel, list[LifecycleEvent]], kernels: dict[str, Any]
) -> None:
    model, events = wrapped
    before = {name: snapshot(model.layer(name)) for name in model.layer_names()}
    calls: list[Callable[[], object]] = [
        lambda: model.set_seed_alpha("layer3", 0, 0.5),
        lambda: model.ramp_seed_alpha("layer3", 0, 0.5, 3),
        lambda: model.retire_seed("layer3", 0),
        lambda: model.layer("act"),
    ]
    for call in calls:
        with pytest.raises(
            UnknownLayerError, match=r"unknown layer '(layer3|act)'.*layer1, layer2"
        ):
            call()
    with pytest.raises(UnknownLayerError, match="'layer3'"):
        await model.load_kernel("layer3", 0, kernels["low_rank"])
    for name, snap in before.items():
        assert_unchanged(model.layer(name), snap)
    assert events == []


# ======================================================================== StateLayout
def test_state_layout_is_in_the_state_dict() -> None:
    layer, _ = linear_layer(seeds=3)
    attach(layer, 1, nn.Linear(6, 5), alpha=0.25)
    state = layer.state_dict()
    for key in ("state", "alpha", "steps_in_state", "error_count", "contribution"):
        assert f"layout.{key}" in state
    assert state["layout.state"].tolist() == [0, int(SeedState.ACTIVE), 0]
    assert state["layout.alpha"].tolist() == [0.0, 0.25, 0.0]


def test_state_layout_follows_the_model_device_but_keeps_its_dtypes() -> None:
    model = nn.Sequential(KasminaLayer(nn.Linear(6, 5), 2, name="fc"))
    layer = model[0]
    assert isinstance(layer, KasminaLayer)
    attach(layer, 0, nn.Linear(6, 5, dtype=torch.float64), blend="lerp", alpha=0.7)
    model.to(torch.float64)
    layout = layer.layout
    assert layer.base_layer.weight.dtype == torch.float64
    assert layout.alpha.dtype == torch.float32 and layout.alpha[0].item() == pytest.approx(0.7)
    assert layout.state.dtype == torch.int8 and layout.error_count.dtype == torch.int64
    assert model(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64

    model.to(torch.bfloat16)
    assert layout.alpha.dtype == torch.float32
    assert layout.alpha[0].item() == torch.tensor(0.7).item()  # not rounded to 0.69921875
    assert torch.isnan(layout.contribution).all()

    model.to("meta")
    for buffer in (layout.state, layout.alpha, layout.steps_in_state, layout.contribution):
        assert buffer.device.type == "meta"
    assert layout.alpha.dtype == torch.float32


# ===================================================================== slot records
def used_slot(layer: KasminaLayer, seed: int) -> None:
    """Give every part of a slot's state a value a fresh slot does not have."""
    attach(layer, seed, Raising(6, 5), blend="lerp", alpha=0.4, grad_isolation=True)
    layer.record_contribution(seed, 0.1)
    layer(torch.randn(2, 6))  # an error: a last error and a count
    layer.advance()  # steps in state
    layer.start_ramp(seed, 0.2, steps=5)
    slot = layer._slots[seed]
    assert slot.last_error is not None and slot.ramp is not None and slot.call is not None
    assert int(layer.layout.error_count[seed]) == 1 and layer.contribution(seed) == 0.1


def assert_fresh(layer: KasminaLayer, seed: int) -> None:
    """Slot `seed` is exactly what a new layer's is: record, buffers, module, checkpoint entry."""
    fresh, _ = linear_layer(seeds=layer.num_seeds, error_threshold=layer.error_threshold)
    assert layer._slots[seed] == fresh._slots[seed] == SeedSlot()
    for name, buffer in layer.layout.named_buffers():
        want = dict(fresh.layout.named_buffers())[name][seed]
        torch.testing.assert_close(buffer[seed], want, rtol=0, atol=0, equal_nan=True)
    assert layer.seed_module(seed) is None and str(seed) not in layer.seeds
    saved = layer.get_extra_state()["seeds"][seed]
    saved_fresh = fresh.get_extra_state()["seeds"][seed]
    assert math.isnan(saved.pop("contribution")) and math.isnan(saved_fresh.pop("contribution"))
    assert saved == saved_fresh


def test_a_recycled_slot_is_exactly_a_fresh_one() -> None:
    layer, _ = linear_layer(error_threshold=5)
    used_slot(layer, 2)
    layer.retire(2, "test")
    assert_fresh(layer, 2)
    assert layer.all_dormant and layer._running_lerp == layer._running_add == ()


def test_a_slot_tripped_by_the_breaker_is_exactly_a_fresh_one() -> None:
    layer, _ = linear_layer(error_threshold=2)
    used_slot(layer, 0)
    layer(torch.randn(2, 6))  # the second error trips the breaker inside the forward
    assert_fresh(layer, 0)


def test_attach_starts_from_a_fresh_slot_whatever_was_written_while_it_was_empty() -> None:
    layer, _ = linear_layer()
    layer.record_contribution(1, 0.5)
    layer.layout.error_count[1] = 2
    attach(layer, 1, nn.Linear(6, 5), alpha=0.25)
    assert math.isnan(layer.contribution(1)) and int(layer.layout.error_count[1]) == 0
    layer.retire(1, "test")
    assert_fresh(layer, 1)


def test_restoring_a_checkpoint_with_an_empty_slot_leaves_it_exactly_fresh() -> None:
    empty = linear_layer()[0].state_dict()
    layer, _ = linear_layer()
    used_slot(layer, 3)
    attach(layer, 1, nn.Linear(6, 5), alpha=0.5)
    layer.load_state_dict(empty)
    assert_fresh(layer, 3)
    assert_fresh(layer, 1)


def test_a_restored_seed_recycles_to_an_exactly_fresh_slot() -> None:
    source, _ = linear_layer()
    used_slot(source, 1)
    layer, _ = linear_layer()
    layer.kernel_loader = lambda kernel_id, kl: Raising(6, 5)
    layer.load_state_dict(source.state_dict())
    # Everything but the last error, which checkpoints do not carry.
    assert layer.seed_info(1) == replace(source.seed_info(1), last_error=None)
    assert int(layer.layout.error_count[1]) == 1 and layer._slots[1].ramp is not None
    layer.retire(1, "test")  # RETIRING with a ramp: this finishes it
    assert_fresh(layer, 1)


def test_a_contribution_survives_a_checkpoint_exactly() -> None:
    """The record keeps the measured value; the float32 buffer would round 0.1."""
    source, _ = linear_layer()
    attach(source, 0, nn.Linear(6, 5), alpha=0.5)
    source.record_contribution(0, 0.1)
    assert source.layout.contribution[0].item() == torch.tensor(0.1).item() != 0.1
    layer, _ = linear_layer()
    layer.kernel_loader = lambda kernel_id, kl: nn.Linear(6, 5)
    layer.load_state_dict(source.state_dict())
    assert layer.contribution(0) == 0.1
    assert math.isnan(layer.contribution(1))


def test_a_checkpoint_without_the_exact_contribution_restores_the_stored_one() -> None:
    source, _ = linear_layer()
    attach(source, 0, nn.Linear(6, 5), alpha=0.5)
    source.record_contribution(0, 0.1)
    state = source.state_dict()
    extra = state["_extra_state"]
    for saved in extra["seeds"]:
        del saved["contribution"]  # as written before the extra state carried it
    layer, _ = linear_layer()
    layer.kernel_loader = lambda kernel_id, kl: nn.Linear(6, 5)
    layer.load_state_dict(state)
    assert layer.contribution(0) == torch.tensor(0.1).item()
    assert math.isnan(layer.contribution(2))


def test_one_index_check_serves_the_layer_and_its_lifecycle() -> None:
    layer, _ = linear_layer(seeds=2)
    for seed in (-1, 2, True, 1.0):
        with pytest.raises(SeedIndexError, match=r"\(0\.\.1\)"):
            layer.check_index(seed)  # type: ignore[arg-type]
        with pytest.raises(SeedIndexError, match=r"\(0\.\.1\)"):
            layer.lifecycle.check(seed, SeedState.ALLOCATED)  # type: ignore[arg-type]
        with pytest.raises(SeedIndexError):
            layer.record_contribution(seed, 0.0)  # type: ignore[arg-type]

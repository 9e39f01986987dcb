"""nn.Conv1d as a host layer: its signature, every built-in that serves it compiled for real in
both formats, and seeds in a wrapped Conv1d model (plain, widening, unbatched, checkpointed)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import esper
from esper.blueprints import BUILTIN_BLUEPRINTS, compile_blueprint, instantiate
from esper.contracts import HostSignature, KernelFormat
from esper.contracts.jobs import HOST_KINDS, MorphogenesisSpec
from esper.kernels import deserialize
from esper.kernels.executor import KernelExecutor
from esper.training.telemetry import _Moments

FORMATS: tuple[KernelFormat, ...] = ("export", "torchscript")
LENGTHS = (9, 16, 41)
CONV1D_BUILTINS = sorted(
    name for name, spec in BUILTIN_BLUEPRINTS.items() if "conv1d" in spec.hosts and not spec.widens
)


def signature(**changes: Any) -> HostSignature:
    return HostSignature(kind="conv1d", in_features=6, out_features=10, **changes)


# ------------------------------------------------------------------------------- signature
@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (nn.Conv1d(6, 10, 3), signature(kernel_size=(1, 3))),
        (
            nn.Conv1d(6, 10, 5, stride=2, padding=3, dilation=2),
            signature(kernel_size=(1, 5), stride=(1, 2), padding=(0, 3), dilation=(1, 2)),
        ),
        (
            nn.Conv1d(6, 10, 4, padding="same", dilation=2),
            signature(kernel_size=(1, 4), padding="same", dilation=(1, 2)),
        ),
        (nn.Conv1d(6, 10, 3, padding="valid"), signature(kernel_size=(1, 3))),
        (nn.Conv1d(6, 10, 1, groups=2), signature(groups=2)),
    ],
)
def test_signature_of_a_conv1d_and_the_shapes_it_gives(
    layer: nn.Conv1d, expected: HostSignature
) -> None:
    host = HostSignature.of(layer)
    assert host == expected
    reference = host.reference_module()
    assert isinstance(reference, nn.Conv1d)
    assert HostSignature.of(reference) == host
    assert (reference.kernel_size, reference.stride, reference.dilation) == (
        layer.kernel_size,
        layer.stride,
        layer.dilation,
    )
    shape = host.input_shape(3)
    assert len(shape) == 3 and shape[:2] == (3, 6)
    for length in LENGTHS:
        x = torch.randn(2, 6, length)
        assert tuple(layer(x).shape) == host.output_shape(tuple(x.shape))


@pytest.mark.parametrize(
    "changes",
    [
        {"kernel_size": (3, 3)},
        {"stride": (2, 1)},
        {"dilation": (2, 1)},
        {"padding": (1, 1)},
    ],
)
def test_a_conv1d_signature_with_a_height_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="conv1d host"):
        signature(**changes)


def test_conv1d_is_a_host_kind_a_job_may_ask_for() -> None:
    assert "conv1d" in HOST_KINDS
    assert MorphogenesisSpec(layer_types=["conv1d"]).layer_types == ["conv1d"]
    assert "conv1d" in MorphogenesisSpec().layer_types


# ------------------------------------------------------------------------------- compiles
HOSTS = {
    "strided": nn.Conv1d(6, 16, 3, stride=2, padding=1),
    "same-dilated": nn.Conv1d(6, 16, 3, padding="same", dilation=2),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("name", CONV1D_BUILTINS)
def test_every_conv1d_builtin_compiles_and_preserves_the_function(
    name: str, host: str, fmt: KernelFormat
) -> None:
    layer = HOSTS[host]
    artifact = compile_blueprint(name, layer, fmt)
    assert artifact.meta.host.kind == "conv1d"
    kernel = KernelExecutor().prepare(deserialize(artifact), layer, artifact.meta.kernel_id)
    for batch, length in zip((1, 4, 7), LENGTHS, strict=True):
        x = torch.randn(batch, 6, length)
        with torch.no_grad():
            out = kernel(x)
        assert out.shape == layer(x).shape
        assert torch.count_nonzero(out) == 0  # function-preserving at birth


def test_conv3x3_is_a_3_wide_conv_on_a_conv1d_host() -> None:
    module = instantiate(BUILTIN_BLUEPRINTS["conv3x3"], HostSignature.of(HOSTS["strided"]))
    convs = [m for m in module.modules() if isinstance(m, nn.Conv1d)]
    assert [c.kernel_size for c in convs] == [(3,), (3,), (1,)]
    assert not any(isinstance(m, nn.Conv2d) for m in module.modules())


def test_squeeze_excite_and_channel_scale_work_on_sequences() -> None:
    host = HostSignature.of(HOSTS["strided"])
    se = instantiate(BUILTIN_BLUEPRINTS["squeeze_excite"], host)[0]
    x = torch.randn(2, 6, 11)
    gated = se(x)
    assert gated.shape == x.shape
    # One gate per channel: a channel scaled the same along the whole sequence.
    ratio = gated / x
    torch.testing.assert_close(ratio, ratio[:, :, :1].expand_as(ratio))
    scale = instantiate(BUILTIN_BLUEPRINTS["norm_scale"], host)[-1]
    assert scale.scale.shape == (16, 1)


# ------------------------------------------------------------------------------- in a model
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=-1))


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    registry = esper.LocalKernelRegistry()
    registry.compile("low_rank", Net().conv)
    a, b = pair()
    registry.compile("widen", HostSignature.of(a).widening(HostSignature.of(b)))
    return registry


def kernel(registry: esper.LocalKernelRegistry, name: str) -> str:
    return next(m.kernel_id for m in registry.list(name=name))


def perturb(module: nn.Module | None) -> None:
    assert module is not None
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


async def test_a_seed_in_a_wrapped_conv1d_changes_the_output_and_checkpoints(
    registry: esper.LocalKernelRegistry,
) -> None:
    torch.manual_seed(0)
    model = Net()
    morphable = esper.wrap(model, seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    assert morphable.layer_names() == ["conv", "head"]
    x = torch.randn(5, 4, 12)
    before = morphable(x).detach()
    await morphable.load_kernel("conv", 0, kernel(registry, "low_rank"), alpha=0.0)
    assert torch.equal(morphable(x), before)
    perturb(morphable.layer("conv").seed_module(0))
    morphable.set_seed_alpha("conv", 0, 0.7)
    after = morphable(x).detach()
    assert not torch.allclose(after, before)

    buffer = io.BytesIO()
    torch.save(morphable.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)  # other host weights: the checkpoint restores them
    restored = esper.wrap(Net(), seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    info = restored.seeds("conv")[0]
    assert info.kernel_id == kernel(registry, "low_rank")
    assert info.alpha == pytest.approx(0.7)
    assert torch.equal(restored(x), after)


async def test_a_seed_takes_an_unbatched_sequence(registry: esper.LocalKernelRegistry) -> None:
    morphable = esper.wrap(Net(), seeds_per_layer=1, kernels=esper.KernelCache([registry]))
    await morphable.load_kernel("conv", 0, kernel(registry, "low_rank"), alpha=1.0)
    perturb(morphable.layer("conv").seed_module(0))
    conv = morphable.layer("conv")
    x = torch.randn(4, 12)  # [C, L], which nn.Conv1d accepts
    out = conv(x)
    assert out.shape == (8, 12)
    torch.testing.assert_close(out, conv(x.unsqueeze(0)).squeeze(0))
    assert not torch.allclose(out, conv.base_layer(x))  # the seed took part
    assert conv.seed_info(0).state.name == "ACTIVE"  # no error recorded, no breaker tripped


def pair() -> tuple[nn.Conv1d, nn.Conv1d]:
    torch.manual_seed(2)
    return nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 5, 5, stride=2, dilation=2)


async def test_a_widening_seed_between_two_conv1d_layers(
    registry: esper.LocalKernelRegistry,
) -> None:
    a, b = pair()
    model = nn.Sequential(a, nn.ReLU(), b)
    morphable = esper.wrap(model, seeds_per_layer=1, kernels=esper.KernelCache([registry]))
    assert morphable.layer("0").next_layer == "2"
    x = torch.randn(3, 4, 30)
    before = morphable(x).detach()
    await morphable.load_kernel("0", 0, kernel(registry, "widen"), alpha=1.0)
    assert torch.equal(morphable(x), before)  # the new units' fan-out starts at zero
    seed = morphable.layer("0").seed_module(0)
    perturb(seed)
    after = morphable(x)
    assert after.shape == before.shape and not torch.allclose(after, before)
    # It is B's output plus the new units' contribution, computed by the seed alone.
    assert seed is not None
    with torch.no_grad():
        torch.testing.assert_close(after, b(torch.relu(a(x))) + seed(x))


def test_telemetry_counts_a_conv1d_output_per_channel() -> None:
    for y in (torch.randn(4, 8, 10), torch.randn(8, 10)):
        moments = _Moments()
        moments.add(y, "conv1d")
        assert moments.alive is not None and moments.alive.shape == (8,)

"""Widening blueprints: a seed across two layers (A → act → B) that reads A's input and adds to
B's output. Spec validation, building for the right host, real compiles in both formats loaded
back through the executor, and the executor's probe against the two layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, compile_blueprint, instantiate
from esper.blueprints.builder import instantiate_shapes
from esper.blueprints.compiler import compile_kernel_id
from esper.blueprints.spec import RESERVED_NAMES
from esper.contracts import HostSignature, KernelFormat
from esper.exceptions import (
    BlueprintHostError,
    BlueprintSpecError,
    KernelShapeError,
    UnsupportedHostError,
)
from esper.kernels import deserialize
from esper.kernels.executor import KernelExecutor

FORMATS: tuple[KernelFormat, ...] = ("export", "torchscript")


def linear_pair() -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(12, 20), nn.Linear(20, 7)


def conv_pair() -> tuple[nn.Conv2d, nn.Conv2d]:
    # B has its own geometry (5×5, dilated, strided, unpadded): next_proj must copy it.
    return nn.Conv2d(6, 16, 3, stride=2, padding=1), nn.Conv2d(16, 10, 5, stride=2, dilation=2)


PAIRS = {"linear": linear_pair, "conv2d": conv_pair}


def widening(a: nn.Module, b: nn.Module) -> HostSignature:
    return HostSignature.of(a).widening(HostSignature.of(b))


def widening_spec(body: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "test_widen", "hosts": ["linear"], "widens": True, "body": body, **extra}


def parse_error(data: object) -> str:
    with pytest.raises(BlueprintSpecError) as caught:
        BlueprintSpec.parse(data)
    return str(caught.value)


HIDDEN = {"op": "host_proj", "out": "mid"}
NEXT = {"op": "next_proj", "out": "out"}


# ------------------------------------------------------------------------------- the spec
def test_widen_is_built_in_and_round_trips() -> None:
    spec = BUILTIN_BLUEPRINTS["widen"]
    assert (
        spec.widens
        and spec.hosts == ["linear", "conv2d", "conv1d"]
        and spec.params == {"ratio": 0.5}
    )
    assert [op.op for op in spec.body] == ["host_proj", "act", "next_proj"]
    assert BlueprintSpec.parse(spec.model_dump_json()) == spec
    assert spec.model_dump(mode="json")["widens"] is True
    assert not any(s.widens for name, s in BUILTIN_BLUEPRINTS.items() if name != "widen")


def test_a_plain_spec_hashes_as_before_widening_existed() -> None:
    plain = BUILTIN_BLUEPRINTS["low_rank"]
    assert "widens" not in plain.canonical()
    assert plain.model_dump(mode="json")["widens"] is False  # still listed
    assert BUILTIN_BLUEPRINTS["widen"].canonical()["widens"] is True


def test_a_widening_blueprint_needs_a_next_proj() -> None:
    message = parse_error(widening_spec([HIDDEN, {"op": "act"}]))
    assert "exactly one top-level next_proj" in message and "found 0" in message


def test_next_proj_must_be_the_last_op() -> None:
    message = parse_error(widening_spec([HIDDEN, NEXT, {"op": "act"}]))
    assert "as its last op" in message and "body[1] (next_proj)" in message


def test_a_widening_blueprint_has_one_next_proj() -> None:
    message = parse_error(widening_spec([HIDDEN, NEXT, NEXT]))
    assert "found 2" in message


def test_next_proj_in_a_plain_blueprint_is_refused() -> None:
    data = widening_spec([HIDDEN, NEXT])
    del data["widens"]
    data["body"] = [{"op": "host_proj", "out": "in"}, NEXT]
    message = parse_error(data)
    assert "body[1] (next_proj)" in message and "widens: true" in message


def test_next_proj_in_a_residual_is_refused() -> None:
    residual = {"op": "residual", "body": [{"op": "next_proj", "out": "mid"}]}
    message = parse_error(widening_spec([HIDDEN, residual, NEXT]))
    assert "body[1].body[0] (next_proj)" in message and "residual" in message


def test_mid_is_reserved_and_only_for_widening_blueprints() -> None:
    assert "mid" in RESERVED_NAMES
    assert "reserved" in parse_error(widening_spec([HIDDEN, NEXT], params={"mid": 2.0}))
    plain = {"name": "test_plain", "hosts": ["linear"], "body": [{"op": "project", "out": "mid"}]}
    assert "names 'mid'" in parse_error(plain)
    BlueprintSpec.parse(widening_spec([{"op": "host_proj", "out": "mid*2"}, NEXT]))


def test_a_conv_widening_blueprint_needs_one_host_geometry_op_before_next_proj() -> None:
    conv = {"hosts": ["conv2d"]}
    message = parse_error(widening_spec([{"op": "project", "out": "mid"}, NEXT], **conv))
    assert "before its next_proj" in message and "found 0" in message
    two = [HIDDEN, {"op": "conv", "out": "mid", "kernel": "host"}, NEXT]
    assert "found 2" in parse_error(widening_spec(two, **conv))
    # next_proj has the next layer's geometry, not the host's: it is not counted.
    BlueprintSpec.parse(widening_spec([HIDDEN, {"op": "act"}, NEXT], **conv))


# ---------------------------------------------------------------------------- the builder
@pytest.mark.parametrize("kind", list(PAIRS))
def test_a_widening_blueprint_is_not_built_for_a_plain_host(kind: str) -> None:
    a, _ = PAIRS[kind]()
    with pytest.raises(BlueprintHostError, match="widening host"):
        instantiate(BUILTIN_BLUEPRINTS["widen"], HostSignature.of(a))
    with pytest.raises(BlueprintHostError, match="widening host"):
        instantiate_shapes(BUILTIN_BLUEPRINTS["widen"], HostSignature.of(a))
    with pytest.raises(BlueprintHostError, match="HostSignature"):
        compile_blueprint("widen", a)  # a module names no downstream layer


@pytest.mark.parametrize("kind", list(PAIRS))
def test_a_plain_blueprint_is_not_built_for_a_widening_host(kind: str) -> None:
    """The builder refuses; the compiler, offered a layer that can be widened, compiles a plain
    blueprint for the layer alone (the orchestrator offers every layer with its downstream)."""
    host = widening(*PAIRS[kind]())
    with pytest.raises(BlueprintHostError, match="not a widening blueprint"):
        instantiate(BUILTIN_BLUEPRINTS["low_rank"], host)
    artifact = compile_blueprint("low_rank", host)
    assert artifact.meta.host == host.layer
    assert artifact.meta.kernel_id == compile_blueprint("low_rank", host.layer).meta.kernel_id


def test_widen_sizes_its_hidden_units_from_mid() -> None:
    a, b = nn.Linear(12, 40), nn.Linear(40, 7)
    module = instantiate(BUILTIN_BLUEPRINTS["widen"], widening(a, b))
    first, last = module[0], module[-1]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (12, 20)  # k = max(4, 40·0.5)
    assert (last.in_features, last.out_features) == (20, 7)
    small = instantiate(BUILTIN_BLUEPRINTS["widen"], widening(nn.Linear(3, 6), nn.Linear(6, 2)))
    assert small[0].out_features == 4  # the floor


def test_next_proj_copies_the_downstream_geometry() -> None:
    a, b = conv_pair()
    last = instantiate(BUILTIN_BLUEPRINTS["widen"], widening(a, b))[-1]
    assert isinstance(last, nn.Conv2d)
    assert (last.kernel_size, last.stride, last.padding, last.dilation) == (
        b.kernel_size,
        b.stride,
        b.padding,
        b.dilation,
    )
    assert last.out_channels == b.out_channels


def test_a_widening_blueprint_must_end_at_the_next_layers_width() -> None:
    spec = BlueprintSpec.parse(widening_spec([HIDDEN, {"op": "next_proj", "out": "mid"}]))
    with pytest.raises(BlueprintHostError, match="the next layer outputs 7"):
        instantiate(spec, widening(*linear_pair()))


# ---------------------------------------------------------------------------- compile + load
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(PAIRS))
def test_widen_compiles_loads_and_preserves_the_function(kind: str, fmt: KernelFormat) -> None:
    a, b = PAIRS[kind]()
    host = widening(a, b)
    artifact = compile_blueprint("widen", host, fmt)
    meta = artifact.meta
    assert meta.host == host and meta.host.downstream == HostSignature.of(b)
    assert meta.kernel_id == compile_kernel_id(BUILTIN_BLUEPRINTS["widen"], host, fmt)
    built = instantiate(BUILTIN_BLUEPRINTS["widen"], host)
    assert meta.params == sum(p.numel() for p in built.parameters())
    assert meta.flops > 0

    kernel = KernelExecutor().prepare(
        deserialize(artifact), a, meta.kernel_id, "fc1", downstream_layer=b
    )
    x = torch.randn(4, 12) if kind == "linear" else torch.randn(4, 6, 29, 23)
    with torch.no_grad():
        out = kernel(x)
        expected = b(torch.relu(a(x)))
    assert out.shape == expected.shape  # B's output, not A's
    assert torch.count_nonzero(out) == 0  # adds nothing at birth
    assert all(p.requires_grad for p in kernel.parameters())


def test_the_linear_flops_count_both_projections() -> None:
    meta = compile_blueprint("widen", widening(*linear_pair())).meta
    assert meta.params == (12 * 10 + 10) + (10 * 7 + 7)  # k = 10 hidden units
    assert meta.flops == 2 * (12 * 10 + 10 * 7)


# ---------------------------------------------------------------------------- the executor
def test_prepare_refuses_a_plain_kernel_for_two_layers() -> None:
    a, b = linear_pair()
    plain = compile_blueprint("low_rank", a)
    with pytest.raises(KernelShapeError, match=r"\(3, 7\)"):
        KernelExecutor().prepare(deserialize(plain), a, plain.meta.kernel_id, downstream_layer=b)


def test_prepare_refuses_a_widening_kernel_for_other_layers() -> None:
    a, b = linear_pair()
    artifact = compile_blueprint("widen", widening(a, b))
    template = deserialize(artifact)
    with pytest.raises(KernelShapeError):
        KernelExecutor().prepare(template, a, artifact.meta.kernel_id)  # no downstream given
    with pytest.raises(KernelShapeError):
        other = nn.Linear(20, 9)
        KernelExecutor().prepare(template, a, artifact.meta.kernel_id, downstream_layer=other)
    with pytest.raises(UnsupportedHostError, match="reads 21 features"):
        KernelExecutor().prepare(
            template, a, artifact.meta.kernel_id, downstream_layer=nn.Linear(21, 7)
        )


def test_prepare_takes_the_dtype_of_the_host_layers() -> None:
    a, b = (layer.double() for layer in conv_pair())
    artifact = compile_blueprint("widen", widening(a, b))
    kernel = KernelExecutor().prepare(
        deserialize(artifact), a, artifact.meta.kernel_id, downstream_layer=b
    )
    assert all(p.dtype == torch.float64 for p in kernel.parameters())

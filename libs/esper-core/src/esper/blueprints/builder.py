"""Instantiate a blueprint for a host signature, initialised function-preserving."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from esper.blueprints.modules import ChannelScale, GatedLinearUnit, Residual, SqueezeExcite
from esper.blueprints.sizes import eval_size
from esper.blueprints.spec import (
    ActOp,
    BlueprintSpec,
    ConvOp,
    DepthwiseOp,
    GLUOp,
    HostProjOp,
    NextProjOp,
    NormOp,
    OpSpec,
    ProjectOp,
    ResidualOp,
    ScaleOp,
    SqueezeExciteOp,
)
from esper.contracts.kernels import HostSignature
from esper.exceptions import BlueprintHostError

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def host_for(spec: BlueprintSpec, host: HostSignature) -> HostSignature:
    """The host `spec` compiles for when offered `host`: a layer that can be widened is offered
    with its downstream layer (the orchestrator does not know which blueprints widen), which a
    plain blueprint leaves aside: it compiles for the layer alone."""
    return host if spec.widens else host.layer


def check_host(spec: BlueprintSpec, host: HostSignature) -> None:
    """Raise BlueprintHostError unless `spec` can be built for `host`: a kind it serves, and a
    widening host (one with `downstream`) for a widening blueprint, a plain one otherwise."""
    if host.kind not in spec.hosts:
        raise BlueprintHostError(
            f"blueprint {spec.name!r} serves {'/'.join(spec.hosts)} hosts, not {host.kind}"
        )
    if spec.widens and host.downstream is None:
        raise BlueprintHostError(
            f"blueprint {spec.name!r} widens a layer into the next one: compile it for a "
            "widening host, HostSignature.of(layer).widening(HostSignature.of(next_layer))"
        )
    if not spec.widens and host.downstream is not None:
        raise BlueprintHostError(
            f"blueprint {spec.name!r} is not a widening blueprint: compile it for the layer's "
            "own signature (host.layer, without downstream), or use a widening blueprint"
        )


class _Builder:
    def __init__(self, spec: BlueprintSpec, host: HostSignature) -> None:
        check_host(spec, host)
        self.spec, self.host = spec, host
        self.conv = host.kind == "conv2d"
        # A widening seed maps A's input to B's output; `mid` is A's output, the widened width.
        self.env = {
            "in": float(host.in_features),
            "out": float(host.seed_out_features),
            **({"mid": float(host.out_features)} if spec.widens else {}),
            **spec.params,
        }

    def build(self) -> nn.Sequential:
        width, layers = self.sequence(self.spec.body, self.host.in_features, "body")
        if width != self.host.seed_out_features:
            whose = "the next layer" if self.spec.widens else "the host"
            raise BlueprintHostError(
                f"blueprint {self.spec.name!r} ends at width {width}, but {whose} outputs "
                f"{self.host.seed_out_features}"
            )
        return nn.Sequential(*layers)

    def sequence(self, ops: list[OpSpec], width: int, path: str) -> tuple[int, list[nn.Module]]:
        layers = []
        for index, op in enumerate(ops):
            width, module = self.op(op, width, f"{path}[{index}] ({op.op})")
            layers.append(module)
        return width, layers

    def size(self, value: int | str, where: str) -> int:
        size = eval_size(value, self.env)
        if size > 1 << 16:
            raise BlueprintHostError(f"{where}: size {value!r} = {size} is implausibly large")
        return size

    def op(self, op: OpSpec, width: int, where: str) -> tuple[int, nn.Module]:
        h = self.host
        if isinstance(op, NextProjOp):
            return self.next_proj(op, width, where)
        if isinstance(op, ProjectOp):  # HostProjOp too
            out = self.size(op.out, where)
            if not self.conv:
                return out, nn.Linear(width, out, bias=op.bias)
            if isinstance(op, HostProjOp):
                return out, nn.Conv2d(
                    width, out, h.kernel_size, h.stride, h.padding, h.dilation, bias=op.bias
                )
            return out, nn.Conv2d(width, out, 1, bias=op.bias)
        if isinstance(op, ConvOp | DepthwiseOp):
            out = width if isinstance(op, DepthwiseOp) else self.size(op.out, where)
            groups = width if isinstance(op, DepthwiseOp) else self.size(op.groups, where)
            if width % groups or out % groups:
                raise BlueprintHostError(
                    f"{where}: groups={groups} must divide in width {width} and out width {out}"
                )
            geometry: dict[str, Any]
            if op.kernel == "host":
                geometry = dict(
                    kernel_size=h.kernel_size,
                    stride=h.stride,
                    padding=h.padding,
                    dilation=h.dilation,
                )
            else:
                geometry = dict(kernel_size=op.kernel, padding=op.kernel // 2)
            return out, nn.Conv2d(width, out, groups=groups, bias=op.bias, **geometry)
        if isinstance(op, NormOp):
            if self.conv:
                return width, nn.GroupNorm(math.gcd(op.groups, width), width)
            return width, nn.LayerNorm(width)
        if isinstance(op, ActOp):
            return width, _ACTIVATIONS[op.fn]()
        if isinstance(op, GLUOp):
            out = self.size(op.out, where)
            proj = (
                nn.Conv2d(width, 2 * out, 1, bias=op.bias)
                if self.conv
                else nn.Linear(width, 2 * out, bias=op.bias)
            )
            return out, GatedLinearUnit(proj, channel_dim=1 if self.conv else -1)
        if isinstance(op, SqueezeExciteOp):
            return width, SqueezeExcite(width, max(1, int(width * op.ratio)), spatial=self.conv)
        if isinstance(op, ScaleOp):
            return width, ChannelScale(width, op.init, spatial=self.conv)
        if isinstance(op, ResidualOp):
            inner, layers = self.sequence(op.body, width, where)
            if inner != width:
                raise BlueprintHostError(f"{where}: the body maps width {width} to {inner}")
            return width, Residual(nn.Sequential(*layers))
        raise BlueprintHostError(f"{where}: unknown op")  # unreachable: the spec is validated

    def next_proj(self, op: NextProjOp, width: int, where: str) -> tuple[int, nn.Module]:
        d = self.host.downstream
        assert d is not None  # check_host: a widening blueprint is built for a widening host
        out = self.size(op.out, where)
        if not self.conv:
            return out, nn.Linear(width, out, bias=op.bias)
        # Dense (groups 1) like host_proj: the new units feed every output channel.
        return out, nn.Conv2d(
            width, out, d.kernel_size, d.stride, d.padding, d.dilation, bias=op.bias
        )


def instantiate(spec: BlueprintSpec, host: HostSignature, seed: int = 0) -> nn.Sequential:
    """Build the seed network; its last parametric op starts at zero so that the seed's output
    is zero at germination (an `add` seed is then function-preserving at any α)."""
    # The modules are built on the CPU: seed only its generator (torch.manual_seed would also
    # reseed every CUDA device, which fork_rng(devices=[]) does not restore).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        module = _Builder(spec, host).build()
    for layer in reversed(list(module)):
        params = list(layer.parameters())
        if params:
            with torch.no_grad():
                for p in params:
                    p.zero_()
            break
    return module


def instantiate_shapes(spec: BlueprintSpec, host: HostSignature) -> nn.Sequential:
    """The seed network on the meta device (shapes, no storage), for sizing a compile before it
    runs. Unlike `instantiate` it touches no RNG: meta tensors draw no random numbers, and
    reseeding the global generator here would race a compile running in another thread."""
    with torch.device("meta"):
        return _Builder(spec, host).build()

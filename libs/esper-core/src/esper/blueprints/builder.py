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
        self.conv = host.kind != "linear"
        # Dims after the channels: a conv1d host is built from 1-D modules (its geometry is the
        # second element of each pair: HostSignature).
        self.spatial_dims = {"linear": 0, "conv1d": 1, "conv2d": 2}[host.kind]
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
                return out, self.conv_like(h, width, out, bias=op.bias)
            return out, self.conv_cls(width, out, 1, bias=op.bias)
        if isinstance(op, ConvOp | DepthwiseOp):
            out = width if isinstance(op, DepthwiseOp) else self.size(op.out, where)
            groups = width if isinstance(op, DepthwiseOp) else self.size(op.groups, where)
            if width % groups or out % groups:
                raise BlueprintHostError(
                    f"{where}: groups={groups} must divide in width {width} and out width {out}"
                )
            if op.kernel == "host":
                return out, self.conv_like(h, width, out, groups=groups, bias=op.bias)
            # An own kernel k is k×k on a conv2d host, k wide on a conv1d one.
            return out, self.conv_cls(
                width, out, op.kernel, padding=op.kernel // 2, groups=groups, bias=op.bias
            )
        if isinstance(op, NormOp):
            if self.conv:
                return width, nn.GroupNorm(math.gcd(op.groups, width), width)
            return width, nn.LayerNorm(width)
        if isinstance(op, ActOp):
            return width, _ACTIVATIONS[op.fn]()
        if isinstance(op, GLUOp):
            out = self.size(op.out, where)
            proj = (
                self.conv_cls(width, 2 * out, 1, bias=op.bias)
                if self.conv
                else nn.Linear(width, 2 * out, bias=op.bias)
            )
            return out, GatedLinearUnit(proj, channel_dim=1 if self.conv else -1)
        if isinstance(op, SqueezeExciteOp):
            hidden = max(1, int(width * op.ratio))
            return width, SqueezeExcite(width, hidden, spatial_dims=self.spatial_dims)
        if isinstance(op, ScaleOp):
            return width, ChannelScale(width, op.init, spatial_dims=self.spatial_dims)
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
        return out, self.conv_like(d, width, out, bias=op.bias)

    @property
    def conv_cls(self) -> type[nn.Conv1d] | type[nn.Conv2d]:
        return nn.Conv1d if self.spatial_dims == 1 else nn.Conv2d

    def conv_like(
        self, layer: HostSignature, width: int, out: int, *, groups: int = 1, bias: bool = True
    ) -> nn.Module:
        """A conv of `layer`'s geometry (kernel, stride, padding, dilation) from width to out."""
        if self.spatial_dims == 1:
            padding: Any = layer.padding if layer.padding == "same" else layer.padding[1]
            return nn.Conv1d(
                width,
                out,
                layer.kernel_size[1],
                layer.stride[1],
                padding,
                layer.dilation[1],
                groups=groups,
                bias=bias,
            )
        return nn.Conv2d(
            width,
            out,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            groups=groups,
            bias=bias,
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

"""A widening seed's first weights, from the data: where its new units look.

A widening seed of layer A adds hidden units between A and the next layer B:
`y_B += W_out σ(W_in x_A + b)`. It is born with `W_out = 0`, so the network's function is the
same at any α. What remains to choose is `W_in, b`, and random directions waste most of the new
units: at birth the only gradient a seed gets is the one on `W_out`, `E[g_B σ(W_in x_A + b)ᵀ]`
(with `g_B = ∂L/∂y_B`), and it is largest when the units respond along the directions of `x_A`
that the back-propagated error is most correlated with: the top right singular vectors of
`M = E[g_B x_Aᵀ]`. This is GradMax's argument (Evci et al., 2022) applied to the other side: GradMax
zeroes the fan-in and points the fan-out along the top singular vectors of M, which leaves a ReLU's
new units dead (their pre-activation is exactly 0); zeroing the fan-out instead keeps them alive.

Each direction v gets units in ± pairs (σ(v·x + b) and σ(−v·x + b′)), so that the pair spans the
linear function along v, with biases at spread quantiles of the projections: hinges at different
places along the direction, which is what more units buy a low-dimensional input. Their scale is
the mean norm of A's own rows, so the new units' pre-activations look like A's.

Linear hosts only: on a convolution the same directions are those of unfolded patches, which this
does not compute; a conv widening seed keeps its compiled (random) fan-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina.layer import KasminaLayer

LossOnSample = Callable[[], torch.Tensor]
"""Runs the model on a fixed sample of training data and returns the loss (a scalar with a graph):
the same batches every time, so that a decision gives the same seed in every run."""


def init_from_gradients(kl: KasminaLayer, seed: int, loss_on_sample: LossOnSample) -> str:
    """Set widening seed `seed` of `kl`'s fan-in from the data (see the module docstring) and
    return what was done, for the decision's reason. The fan-out is left as it is (zero at
    birth); the network's output is unchanged."""
    module = kl.seed_module(seed)
    downstream = kl.downstream
    if module is None or downstream is None or not kl.seed_info(seed).widens:
        raise ValueError(f"seed {seed} of layer {kl.layer_name!r} is not a widening seed")
    if kl.signature.kind != "linear":
        return "fan-in as compiled (the data init is for linear layers)"
    fan_in = _fan_in(module, kl.signature.in_features)
    if fan_in is None:
        return "fan-in as compiled (no projection from the layer's input found in the kernel)"
    weight, bias = fan_in
    inputs, grads = _sample(kl, downstream, loss_on_sample)
    directions, strengths = _error_directions(inputs, grads)
    if directions.shape[0] == 0:
        return "fan-in as compiled (the sampled gradient is zero)"
    host_weight = kl.base_layer.weight
    assert isinstance(host_weight, torch.Tensor)
    scale = float(host_weight.detach().norm(dim=1).mean())
    _place_units(weight, bias, directions, inputs, scale)
    top = ", ".join(f"{s:.3g}" for s in strengths[: min(3, len(strengths))])
    return (
        f"fan-in along the top {directions.shape[0]} singular direction(s) of Σ ∂L/∂y·xᵀ "
        f"(σ = {top}), fan-out zero"
    )


def _fan_in(module: nn.Module, in_features: int) -> tuple[nn.Parameter, nn.Parameter | None] | None:
    """The kernel's first projection from the layer's input: its weight and bias parameters."""
    named = dict(module.named_parameters())
    for name, param in named.items():
        if param.dim() == 2 and param.shape[1] == in_features:
            bias_name = name.removesuffix("weight") + "bias"
            bias = named.get(bias_name) if bias_name != name else None
            if bias is not None and bias.shape != (param.shape[0],):
                bias = None
            return param, bias
    return None


def _sample(
    kl: KasminaLayer, downstream: KasminaLayer, loss_on_sample: LossOnSample
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_A and ∂L/∂y_B on the sample, as [N, features] float64 tensors."""
    captured: dict[str, torch.Tensor] = {}

    def take_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["x"] = args[0].detach()

    def take_output(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        captured["y"] = output

    handles = [
        kl.register_forward_pre_hook(take_input),
        downstream.register_forward_hook(take_output),
    ]
    try:
        with torch.enable_grad():
            loss = loss_on_sample()
            (grad,) = torch.autograd.grad(loss, captured["y"])
    finally:
        for handle in handles:
            handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    g = grad.detach().reshape(-1, grad.shape[-1]).double()
    return x, g


def _error_directions(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The right singular vectors of M = Σ g xᵀ with a non-negligible singular value (the loss
    is a batch mean: each g carries its 1/N, so M is on the scale of a weight gradient)."""
    m = g.T @ x
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh[:0], []
    keep = s > s[0] * 1e-3
    return vh[keep], [float(v) for v in s[keep]]


def _place_units(
    weight: nn.Parameter,
    bias: nn.Parameter | None,
    directions: torch.Tensor,
    x: torch.Tensor,
    scale: float,
) -> None:
    """Unit j: direction ±v_{(j/2) mod r}, its hinge at a quantile of the sample's projections."""
    units = weight.shape[0]
    rows = torch.empty(units, weight.shape[1], dtype=torch.float64)
    offsets = torch.zeros(units, dtype=torch.float64)
    count = directions.shape[0]
    per_direction = math.ceil(math.ceil(units / 2) / count)  # pairs per direction
    for j in range(units):
        pair, sign = divmod(j, 2)
        direction = directions[pair % count] * (1.0 if sign == 0 else -1.0)
        rows[j] = direction * scale
        level = (pair // count + 1) / (per_direction + 1)  # spread hinges along the direction
        projection = (x @ rows[j]).quantile(level if sign == 0 else 1.0 - level)
        offsets[j] = -projection
    with torch.no_grad():
        weight.copy_(rows.to(weight.dtype))
        if bias is not None:
            bias.copy_(offsets.to(bias.dtype))

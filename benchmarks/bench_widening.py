"""What a widening seed costs at run time next to a seed that stays inside one layer.

A widening seed of layer A (built-in `widen`, k = mid/2 new hidden units between A and the next
layer B) reads A's input and adds to B's output. Per case (an MLP and a CNN whose first two convs
are consecutive through a ReLU), one fwd+bwd train step of:

- wrapped: the wrapped host, no seed (the baseline), and an A/A twin of it (the noise floor);
- widen: one widening seed on the first layer;
- inlayer: one `low_rank` seed on the same layer, its rank chosen so that it has about the
  widening seed's parameter count;
- wider: a plain nn.Sequential of the widened network (A with k more units, B reading them),
  checked to compute what the widening seed's model computes.

Figures: widen, inlayer and wider against wrapped; widen_vs_inlayer; widen_vs_wider (what the
seed costs over the network it amounts to); noise_floor, the wrapped host against its A/A twin.

All variants are timed in the same rounds, in a shuffled order; a ratio is the median of its
per-round ratios, `_lo`/`_hi` the ends of its 95 % confidence interval.

Prints one JSON line and one line of figures at the end.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable

import torch
from torch import nn

import esper
from _timing import interleaved_times, median_ci
from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, instantiate

Builder = Callable[[int], nn.Sequential]  # extra hidden units of the first layer → network
# Rounds per case: about 4 minutes in all on a 2-core CPU.
ROUNDS = 500
PAIRS = {
    "noise_floor": ("twin", "wrapped"),
    "widen": ("widen", "wrapped"),
    "inlayer": ("inlayer", "wrapped"),
    "widen_vs_inlayer": ("widen", "inlayer"),
    "widen_vs_wider": ("widen", "wider"),
    "wider": ("wider", "wrapped"),
}


def mlp(extra: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 512 + extra),
        nn.ReLU(),
        nn.Linear(512 + extra, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
    )


def cnn(extra: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32 + extra, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32 + extra, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_low_rank(first: nn.Module, params: int) -> BlueprintSpec:
    """`low_rank` with the rank whose parameter count is nearest `params` (it grows linearly)."""
    spec = BUILTIN_BLUEPRINTS["low_rank"]
    host = esper.HostSignature.of(first)

    def count(rank: int) -> int:
        ranked = spec.model_copy(update={"params": {"rank": rank}})
        return parameter_count(instantiate(ranked, host))

    per_rank = count(2) - count(1)
    rank = max(1, round((params - count(1)) / per_rank) + 1)
    return spec.model_copy(update={"params": {"rank": rank}})


async def with_seed(
    model: nn.Sequential, spec: BlueprintSpec, host: esper.HostSignature
) -> esper.MorphableModel:
    """The wrapped model (a new container over the same layers) with one seed on layer "0"."""
    registry = esper.LocalKernelRegistry()
    kernel_id = registry.compile(spec, host).kernel_id
    morphable = esper.wrap(
        nn.Sequential(*model), seeds_per_layer=4, kernels=esper.KernelCache([registry])
    )
    await morphable.load_kernel("0", 0, kernel_id, blend="add", alpha=1.0)
    for p in morphable.seed_parameters("0", 0):
        nn.init.normal_(p, std=0.01)  # small and nonzero: no seed output is zero or skipped
    return morphable


def no_seed(model: nn.Sequential) -> esper.MorphableModel:
    return esper.wrap(nn.Sequential(*model), seeds_per_layer=4, kernels=esper.KernelCache())


def widened(build: Builder, model: nn.Sequential, seed: nn.Module, extra: int) -> nn.Sequential:
    """The network a widening seed on layer 0 (α = 1) amounts to, as plain layers: layer 0's
    units then the seed's, and layer 2 reading both, plus the seed's output bias."""
    wider = build(extra)
    own = seed.state_dict()
    first, second = model[0].state_dict(), model[2].state_dict()
    for i, layer in enumerate(model):
        if i not in (0, 2):
            wider[i].load_state_dict(layer.state_dict())
    wider[0].load_state_dict(
        {
            "weight": torch.cat([first["weight"], own["0.weight"]]),
            "bias": torch.cat([first["bias"], own["0.bias"]]),
        }
    )
    wider[2].load_state_dict(
        {
            "weight": torch.cat([second["weight"], own["2.weight"]], dim=1),
            "bias": second["bias"] + own["2.bias"],
        }
    )
    return wider


def compare_case(label: str, build: Builder, x: torch.Tensor, rounds: int) -> dict[str, float]:
    model = build(0)
    first, second = model[0], model[2]
    wide_host = esper.HostSignature.of(first).widening(esper.HostSignature.of(second))
    widen = asyncio.run(with_seed(model, BUILTIN_BLUEPRINTS["widen"], wide_host))
    seed = widen.layer("0").seed_module(0)
    assert seed is not None
    params = parameter_count(seed)
    extra = dict(seed.named_parameters())["0.bias"].numel()  # k, the new hidden units
    inlayer_spec = matched_low_rank(first, params)
    inlayer = asyncio.run(with_seed(model, inlayer_spec, esper.HostSignature.of(first)))
    wider = widened(build, model, seed, extra)
    with torch.no_grad():
        torch.testing.assert_close(wider(x), widen(x), rtol=1e-4, atol=1e-5)
    variants: dict[str, nn.Module] = {
        "wrapped": no_seed(model),
        "twin": no_seed(model),
        "widen": widen,
        "inlayer": inlayer,
        "wider": wider,
    }
    inlayer_params = sum(p.numel() for p in inlayer.seed_parameters("0", 0))
    print(
        f"{label}: widen k={extra} ({params} params), "
        f"low_rank rank={inlayer_spec.params['rank']} ({inlayer_params} params)"
    )
    times = interleaved_times(
        {name: functools.partial(train_step, m, x) for name, m in variants.items()}, rounds=rounds
    )
    figures: dict[str, float] = {}
    for figure, (candidate, baseline) in PAIRS.items():
        ratios = [c / b for c, b in zip(times[candidate], times[baseline], strict=True)]
        mid, low, high = median_ci(ratios)
        figures[f"{figure}_{label}"] = mid
        figures[f"{figure}_{label}_lo"] = low
        figures[f"{figure}_{label}_hi"] = high
    figures[f"wrapped_ms_{label}"] = median_ci(times["wrapped"])[0] * 1e3
    return figures


def main() -> None:
    torch.manual_seed(0)
    figures: dict[str, float] = {}
    figures.update(compare_case("mlp", mlp, torch.randn(256, 512), rounds=ROUNDS))
    figures.update(compare_case("cnn", cnn, torch.randn(16, 3, 32, 32), rounds=ROUNDS))
    line = " ".join(f"{k}={v:.3f}" for k, v in figures.items())
    print(json.dumps({"bench": "widening", **{k: round(v, 4) for k, v in figures.items()}}))
    print(f"widening: {line}")


if __name__ == "__main__":
    main()

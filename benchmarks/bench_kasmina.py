"""KasminaLayer costs, each as a ratio against a baseline run side by side in this process:

- dormant overhead: fwd+bwd of the wrapped model (all seeds dormant) / the bare model;
- one active low-rank seed per layer / a hand-written module with the same branch;
- attach: load_kernel of a kernel already in the memory cache, call → ACTIVE at α = 0 (p50).

Per model, every variant is timed in the same rounds, in a shuffled order; a ratio is the median
of its per-round ratios, `_lo`/`_hi` the ends of its 95 % confidence interval. The noise floor is
the bare model against itself (another container over the same layers). A verdict is "pass" only
when the whole interval is within the target and the noise floor's interval within the margin the
target allows; "fail" when the whole interval is over; otherwise "inconclusive" (not a pass).

Prints one line of figures at the end.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time

import torch
from torch import nn

import esper
from _timing import interleaved_times, median_ci, percentile

TARGETS = {"dormant": 1.01, "active_lowrank": 1.05}


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
    )


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


class HandLowRank(nn.Module):
    """The baseline for an active seed: host + α·B(A(x)), written by hand."""

    def __init__(self, host: nn.Module, seed: nn.Module) -> None:
        super().__init__()
        self.host, self.seed = host, seed
        self.register_buffer("alpha", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x) + self.alpha * self.seed(x)


def same_hosts(model: nn.Sequential) -> nn.Sequential:
    """A new container over the very same layer objects: the variants compared share their host
    parameters, so no difference in memory placement leaks into the ratio."""
    return nn.Sequential(*model)


def hand_written(model: nn.Sequential) -> nn.Module:
    """Replace every host by HandLowRank with the same eager low-rank branch as the seed."""
    model = same_hosts(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear | nn.Conv2d):
            seed = esper.blueprints.instantiate(
                esper.get_blueprint("low_rank"), esper.HostSignature.of(module)
            )
            for p in seed.parameters():
                nn.init.normal_(p, std=0.01)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, HandLowRank(module, seed))
    return model


async def with_active_seeds(model: nn.Sequential) -> esper.MorphableModel:
    model = same_hosts(model)
    registry = esper.LocalKernelRegistry()
    hosts = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    kernel_ids = {n: registry.compile("low_rank", m).kernel_id for n, m in hosts.items()}
    morphable = esper.wrap(model, seeds_per_layer=4, kernels=esper.KernelCache([registry]))
    for name, kernel_id in kernel_ids.items():
        await morphable.load_kernel(name, 0, kernel_id, blend="add", alpha=0.5)
        for p in morphable.seed_parameters(name, 0):
            nn.init.normal_(p, std=0.01)
    return morphable


async def attach_p50(samples: int = 200) -> float:
    host = nn.Sequential(nn.Linear(512, 512))
    registry = esper.LocalKernelRegistry()
    kernel_id = registry.compile("low_rank", host[0]).kernel_id
    morphable = esper.wrap(host, seeds_per_layer=4, kernels=esper.KernelCache([registry]))
    await morphable.kernels.get(kernel_id)  # in the memory cache from here on
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        await morphable.load_kernel("0", 0, kernel_id, alpha=0.0)
        times.append(time.perf_counter() - start)
        morphable.unload_seed("0", 0)
    return percentile(times, 50)


def compare_case(
    label: str, model: nn.Sequential, x: torch.Tensor, rounds: int
) -> dict[str, float]:
    variants: dict[str, nn.Module] = {
        "bare": model,
        "twin": same_hosts(model),
        "wrapped": esper.wrap(same_hosts(model), seeds_per_layer=4, kernels=esper.KernelCache()),
        "hand": hand_written(model),
        "active": asyncio.run(with_active_seeds(model)),
    }
    times = interleaved_times(
        {name: functools.partial(train_step, m, x) for name, m in variants.items()}, rounds=rounds
    )
    pairs = {
        "noise_floor": ("twin", "bare"),
        "dormant": ("wrapped", "bare"),
        "active_lowrank": ("active", "hand"),
    }
    figures: dict[str, float] = {}
    for figure, (candidate, baseline) in pairs.items():
        ratios = [c / b for c, b in zip(times[candidate], times[baseline], strict=True)]
        mid, low, high = median_ci(ratios)
        figures[f"{figure}_{label}"] = mid
        figures[f"{figure}_{label}_lo"] = low
        figures[f"{figure}_{label}_hi"] = high
    return figures


def verdict(figures: dict[str, float], figure: str, label: str) -> str:
    """pass: the whole confidence interval is within the target; fail: all of it is over;
    inconclusive: it straddles the target, or the A/A interval reaches past the target's margin
    (this run's noise could hide or fake an effect of that size)."""
    target = TARGETS[figure]
    margin = target - 1
    floor_lo, floor_hi = figures[f"noise_floor_{label}_lo"], figures[f"noise_floor_{label}_hi"]
    if floor_lo < 1 - margin or floor_hi > 1 + margin:
        return "inconclusive"
    if figures[f"{figure}_{label}_hi"] <= target:
        return "pass"
    return "fail" if figures[f"{figure}_{label}_lo"] > target else "inconclusive"


def main() -> None:
    torch.manual_seed(0)
    figures: dict[str, float] = {}
    figures.update(compare_case("mlp", mlp(), torch.randn(256, 512), rounds=800))
    # 1,000 CNN rounds: at 400 the A/A interval was ±1-2.5 % on this 2-core machine, too wide to
    # judge a 1 % target; at 1,000 it is 0.994-1.005 (about 5 minutes).
    figures.update(compare_case("cnn", cnn(), torch.randn(64, 3, 32, 32), rounds=1000))
    figures["attach_p50_ms"] = asyncio.run(attach_p50()) * 1e3
    verdicts = {
        f"verdict_{figure}_{label}": verdict(figures, figure, label)
        for figure in TARGETS
        for label in ("mlp", "cnn")
    }
    line = " ".join(f"{k}={v:.3f}" for k, v in figures.items())
    said = " ".join(f"{k}={v}" for k, v in verdicts.items())
    print(
        json.dumps({"bench": "kasmina", **{k: round(v, 4) for k, v in figures.items()}, **verdicts})
    )
    print(
        f"kasmina: {line} {said} (targets: dormant ≤ 1.01, active_lowrank ≤ 1.05, "
        "attach_p50_ms ≤ 1; a verdict needs the 95 % interval within the target)"
    )


if __name__ == "__main__":
    main()

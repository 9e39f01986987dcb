"""Grow a model that underfits: a tiny MLP on two spirals plateaus, a seed is germinated in its
hidden layer, ramped in and trained, and the validation accuracy shows what the seed added.

    python examples/grow_spirals.py [--seed 0]

Library only: no service runs. The platform automates the same steps (Tamiyo decides, Tolaria
executes); here they are spelled out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import math

import torch
from torch import nn

import esper

EPOCHS = 30


def two_spirals(
    n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=generator) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    xy = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / (3 * math.pi)
    return xy + noise * torch.randn(n, 2, generator=generator), label


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(
    model: esper.MorphableModel,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
) -> float:
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            model.clip_seed_gradients()
            opt.step()
            model.step()  # α ramps advance, circuit breakers are polled
    return loss.item()


async def main(seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = two_spirals(1500, 0.02, gen)
    x_val, y_val = two_spirals(1000, 0.02, gen)

    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    control = esper.wrap(copy.deepcopy(model), seeds_per_layer=1, kernels=esper.KernelCache())
    registry = esper.LocalKernelRegistry()
    kernel = registry.compile("wide_mlp", model[2], tags=["spiral_growth_v1"])
    morphable = esper.wrap(model, seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    morphable.add_listener(
        lambda e: print(
            f"  event: {e.layer}[{e.seed}] {e.from_state.name} → {e.to_state.name} ({e.reason})"
        )
    )
    opt = torch.optim.Adam(morphable.parameters(), lr=0.01)
    morphable.attach_optimizer(opt, lr=0.01, max_grad_norm=1.0)

    loss = train(morphable, opt, x_train, y_train, EPOCHS, gen)
    before = accuracy(morphable, x_val, y_val)
    host_params = sum(p.numel() for p in morphable.host_parameters())
    print(f"host alone:   loss {loss:.3f}  val acc {before:.3f}  params {host_params}")

    print(f"germinating {kernel.blueprint} ({kernel.params} params) in layer '2', seed 0")
    await morphable.load_kernel("2", seed_idx=0, kernel_id="spiral_growth_v1", alpha=0.0)
    morphable.ramp_seed_alpha("2", 0, target=1.0, steps=200)
    loss = train(morphable, opt, x_train, y_train, EPOCHS, gen)
    after = accuracy(morphable, x_val, y_val)
    contribution = morphable.measure_contribution("2", 0, lambda: accuracy(morphable, x_val, y_val))

    # The fair baseline: the same host, trained for as many epochs, never grown.
    control_opt = torch.optim.Adam(control.parameters(), lr=0.01)
    train(control, control_opt, x_train, y_train, 2 * EPOCHS, torch.Generator().manual_seed(seed))
    baseline = accuracy(control, x_val, y_val)
    info = morphable.seeds("2")[0]
    state = f"α={info.alpha:.2f} state={info.state.name}"
    print(f"with seed:    loss {loss:.3f}  val acc {after:.3f}  {state}")
    print(f"seed contribution (val acc with seed − with α forced to 0): {contribution:+.3f}")
    print(f"control:      the same host, {2 * EPOCHS} epochs, never grown: val acc {baseline:.3f}")
    return {"before": before, "after": after, "contribution": contribution, "control": baseline}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    result = asyncio.run(main(parser.parse_args().seed))
    print(
        f"RESULT val_acc_before={result['before']:.3f} val_acc_after={result['after']:.3f} "
        f"val_acc_control={result['control']:.3f} contribution={result['contribution']:+.3f}"
    )

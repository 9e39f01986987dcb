"""Tolaria's training loop against a plain PyTorch loop, side by side in one process.

Each case builds a real job — JobTrainer with its JobRuntime (bus thread and all) on a real
redis-server, the model wrapped with dormant seed slots, step telemetry on (a step report every
100 steps) — and, beside it, the same model (same init), data, batch order, batch size and
optimizer in the loop one writes by hand (shuffle, then forward, loss, backward, step per batch).
A round times one epoch of each, back to back, in alternating order; the figure is the median
over rounds of samples/s(Tolaria) / samples/s(plain). What is timed is what the job's own
`samples_per_s` covers: `train_epoch`, not the epoch's end (validation, checkpoint, epoch report),
which a plain loop does not do either.

Cases: the growth demo's small MLP (2-8-8-2 tanh, batch 64, as in examples/grow_spirals.py) on
two spirals, where per-step overhead shows most, and the zoo's small CNN on 3×16×16 images. The
MLP gets many rounds: an epoch is ~15 ms, and the median of a few dozen moves by ±2 % between
runs on a shared machine. Prints one line of figures at the end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esper.bus import BusSettings
from esper.contracts import JobSpec
from esper.testing import RedisServer
from tolaria.models import build_model
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer, make_optimizer

ROUNDS = {"mlp": 240, "cnn": 60}  # as many as fit in ~10 s each: the median settles
WARMUP = 3


def cases(data_dir: Path) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2000, 3, 16, 16)).astype(np.float32)
    np.savez(data_dir / "images.npz", x=images, y=rng.integers(0, 10, 2000).astype(np.int64))
    return {
        "mlp": {
            "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
            "dataset": {"kind": "spirals", "samples": 2500, "noise": 0.1},
            "training": {"batch_size": 64, "lr": 0.01, "telemetry_every_steps": 100},
        },
        "cnn": {
            "model": {"kind": "cnn", "channels": [16, 32], "hidden": 64},
            "dataset": {"kind": "npz", "path": "images.npz"},
            "training": {"batch_size": 64, "lr": 0.001, "telemetry_every_steps": 100},
        },
    }


def plain_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    batch_size: int,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for begin in range(0, len(order), batch_size):
        index = order[begin : begin + batch_size]
        loss = loss_fn(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure(name: str, raw_spec: dict[str, Any], settings: TolariaSettings) -> float:
    spec = JobSpec.model_validate(raw_spec)
    runtime = JobRuntime(settings, f"bench-{name}").start()
    try:
        trainer = JobTrainer(runtime, spec, settings.data_dir, settings.work_dir)
        data = trainer.data
        torch.manual_seed(spec.training.seed)
        plain = build_model(spec.model, data.input_shape, data.classes)
        plain_opt = make_optimizer(list(plain.parameters()), spec.training)
        batch = spec.training.batch_size
        ratios = []
        for r in range(WARMUP + ROUNDS[name]):

            def tolaria_epoch(epoch: int = r) -> float:
                start = time.perf_counter()
                trainer.train_epoch(epoch)
                return time.perf_counter() - start

            def plain_timed(seed: int = r) -> float:
                start = time.perf_counter()
                plain_epoch(plain, plain_opt, data.train_x, data.train_y, seed, batch)
                return time.perf_counter() - start

            if r % 2:
                t_tol, t_plain = tolaria_epoch(), plain_timed()
            else:
                t_plain, t_tol = plain_timed(), tolaria_epoch()
            if r >= WARMUP:
                ratios.append(t_plain / t_tol)  # equal samples: time ratio = samples/s ratio
        steps = -(-len(data.train_y) // batch)
        print(f"{name}: {steps} steps/epoch, ratio p50 {statistics.median(ratios):.3f}")
        return statistics.median(ratios)
    finally:
        runtime.close()


def main() -> None:
    torch.set_num_threads(1)
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = TolariaSettings(
            data_dir=root,
            work_dir=root / "work",
            urza_url=None,
            bus=BusSettings(redis_url=redis.url),
        )
        figures = {
            f"{name}_ratio": measure(name, spec, settings) for name, spec in cases(root).items()
        }
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

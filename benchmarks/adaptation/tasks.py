"""The benchmark's tasks: a data set, an initial network small enough to underfit it, and the
training every arm shares. File data sets are written here into Tolaria's data directory."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper.contracts.jobs import JobSpec
from tolaria.models import build_model

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    dataset: dict[str, Any]
    """The spec's `dataset`; its `split.seed` is set per RNG seed."""
    model: dict[str, Any]
    """The initial network (the spec's `model`)."""
    input_shape: Shape
    classes: int
    epochs: int
    batch_size: int = 64
    lr: float = 0.01
    write: Callable[[Path], None] | None = None
    """Writes the task's files under the data directory (None: a generated set)."""
    extra: dict[str, Any] = field(default_factory=dict)


SPLIT = {"validation": 0.2, "test": 0.2}
"""A fifth of the samples for testing: a point of accuracy is then several test samples."""


# ------------------------------------------------------------ file data
def _write_tabular(data_dir: Path) -> None:
    """20 classes over 32 Gaussian features, labelled by a random teacher network (32-48-20,
    tanh): the argmax of its logits. Nonlinear, and every class occurs."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((10000, 32)).astype(np.float32)
    w1 = rng.standard_normal((32, 48)) / np.sqrt(32)
    w2 = rng.standard_normal((48, 20)) / np.sqrt(48) * 3.0
    y = np.argmax(np.tanh(x @ w1 * 2.0) @ w2, axis=1).astype(np.int64)
    np.savez(data_dir / "tabular20.npz", x=x, y=y)


def _write_images(data_dir: Path) -> None:
    """CIFAR-10 python batches of 32×32 RGB images, 10 classes: a sinusoidal grating whose
    orientation and frequency depend on the class, at a random phase, tinted at random, under
    pixel noise. A texture to recognise anywhere in the image, which a few conv channels with
    global average pooling see only roughly."""
    rng = np.random.default_rng(4321)
    n, size = 3000, 32
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    coords = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1)
    angle = labels * np.pi / 5 + rng.normal(0.0, 0.15, n)
    freq = np.where(labels % 2 == 0, 0.35, 0.6)
    phase = rng.uniform(0.0, 2 * np.pi, n)
    direction = np.stack([np.cos(angle), np.sin(angle)], -1)  # [n, 2]
    wave = np.sin(
        np.einsum("hwk,nk->nhw", coords, direction) * freq[:, None, None] + phase[:, None, None]
    )
    tint = rng.uniform(0.3, 1.0, (n, 3))
    images = (
        128 + 40 * tint[:, :, None, None] * wave[:, None] + rng.normal(0, 70, (n, 3, size, size))
    )
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1)
    directory = data_dir / "gratings"
    directory.mkdir(parents=True, exist_ok=True)
    halves = [(0, n // 2), (n // 2, n)]
    for i, (lo, hi) in enumerate(halves, start=1):
        batch = {
            b"batch_label": f"data_batch_{i}".encode(),
            b"labels": labels[lo:hi].tolist(),
            b"data": data[lo:hi],
        }
        (directory / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))


# ---------------------------------------------------------------- tasks
TASKS: tuple[Task, ...] = (
    Task(
        name="moons",
        description="two interleaved half circles (Tolaria's `moons`, 3,000 samples, noise "
        "0.15); MLP 2-2-2 tanh",
        dataset={"kind": "moons", "samples": 3000, "noise": 0.15, "seed": 7},
        model={"kind": "mlp", "hidden": [2], "activation": "tanh"},
        input_shape=(2,),
        classes=2,
        epochs=24,
    ),
    Task(
        name="checkerboard",
        description="6×6 checkerboard (Tolaria's `checkerboard`, 8,000 samples, noise 0.02); "
        "MLP 2-6-6-2 relu",
        dataset={"kind": "checkerboard", "cells": 6, "samples": 8000, "noise": 0.02, "seed": 7},
        model={"kind": "mlp", "hidden": [6, 6], "activation": "relu"},
        input_shape=(2,),
        classes=2,
        epochs=24,
    ),
    Task(
        name="tabular20",
        description="20 classes, 32 Gaussian features labelled by a random tanh teacher "
        "network (NPZ, 10,000 samples); MLP 32-12-20 relu",
        dataset={"kind": "npz", "path": "tabular20.npz"},
        model={"kind": "mlp", "hidden": [12], "activation": "relu"},
        input_shape=(32,),
        classes=20,
        epochs=24,
        write=_write_tabular,
    ),
    Task(
        name="gratings",
        description="10 classes of noisy tinted gratings as CIFAR-10 python batches (3,000 "
        "32×32 RGB images); CNN conv 4-8, fc 16",
        dataset={"kind": "cifar10", "path": "gratings"},
        model={"kind": "cnn", "channels": [4, 8], "hidden": 16, "activation": "relu"},
        input_shape=(3, 32, 32),
        classes=10,
        epochs=16,
        write=_write_images,
    ),
    Task(
        name="blobs16",
        description="16 overlapping Gaussian blobs in 64 dimensions (Tolaria's `blobs`, 4,000 "
        "samples, noise 1.5); MLP 64-4-16 relu",
        dataset={
            "kind": "blobs",
            "samples": 4000,
            "noise": 1.5,
            "seed": 7,
            "classes": 16,
            "features": 64,
        },
        model={"kind": "mlp", "hidden": [4], "activation": "relu"},
        input_shape=(64,),
        classes=16,
        epochs=24,
    ),
)


def task_named(name: str) -> Task:
    for task in TASKS:
        if task.name == name:
            return task
    raise KeyError(f"no task {name!r}; tasks: {', '.join(t.name for t in TASKS)}")


# ------------------------------------------------------------- sizing
def count_parameters(model: dict[str, Any], task: Task) -> int:
    """The trainable parameters of `model` for the task's data, as Tolaria builds it (on the
    meta device: nothing is allocated)."""
    spec = JobSpec.model_validate({"model": model, "dataset": {"kind": "moons"}}).model
    with torch.device("meta"):
        built = build_model(spec, task.input_shape, task.classes)
    return sum(p.numel() for p in built.parameters())


def widened(model: dict[str, Any], factor: float) -> dict[str, Any]:
    """Every hidden width (MLP `hidden`; CNN `channels` and `hidden`) × factor, rounded, ≥ 1."""

    def scale(width: int) -> int:
        return max(1, round(width * factor))

    if model["kind"] == "mlp":
        return {**model, "hidden": [scale(w) for w in model["hidden"]]}
    if model["kind"] == "cnn":
        return {
            **model,
            "channels": [scale(c) for c in model["channels"]],
            "hidden": scale(model["hidden"]),
        }
    raise ValueError(f"cannot widen a {model['kind']} model")


def _factors() -> list[float]:
    return [1.0 + i / 100 for i in range(0, 3000)]


def matching(task: Task, target: int) -> dict[str, Any]:
    """The rule of static-same-size: the initial network with every hidden width multiplied by
    one common factor (≥ 1, steps of 0.01), the one whose parameter count is nearest to
    `target` (ties: the smaller)."""
    best: tuple[int, dict[str, Any]] | None = None
    seen: set[str] = set()
    for factor in _factors():
        model = widened(task.model, factor)
        key = repr(model)
        if key in seen:
            continue
        seen.add(key)
        gap = abs(count_parameters(model, task) - target)
        if best is None or gap < best[0]:
            best = (gap, model)
        elif count_parameters(model, task) > target:
            break  # counts only grow with the factor: nothing further is nearer
    assert best is not None
    return best[1]


def large(task: Task, times: int = 4) -> dict[str, Any]:
    """The rule of static-large: the smallest common widening factor (steps of 0.01) that gives
    at least `times` × the initial network's parameters."""
    floor = times * count_parameters(task.model, task)
    for factor in _factors():
        model = widened(task.model, factor)
        if count_parameters(model, task) >= floor:
            return model
    raise ValueError(f"{task.name}: no widening up to ×30 reaches {floor} parameters")

"""The data a job trains on: generated sets, or files under the data directory (read by
dataformats.py), split into train / validation / test and normalised with training statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper.contracts.jobs import DatasetSpec, ExternalData, FileData, Split, SyntheticData
from tolaria.dataformats import read_files
from tolaria.dataheaders import read_geometry
from tolaria.errors import Location, SpecError

MAX_SYNTHETIC_VALUES = 1 << 28
"""Generated sets are held in memory as float32: at most this many numbers (1 GiB)."""

_DATASET: Location = ["spec", "dataset"]
_TURNS = 4  # of each spiral arm: enough bends that a tiny network cannot follow them all


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Disjoint splits as CPU tensors: features float32 `[N, *input_shape]`, labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    """One sample's shape: `(F,)` for features, `(C, H, W)` for images."""
    classes: int
    description: str


def load_dataset(spec: DatasetSpec, data_dir: Path) -> DataSplits:
    """Generate or read the data, split it by `spec.split`, and standardise it: per feature for
    tabular data, per channel for images, with the mean and deviation of the training split
    only, so nothing about the held-out samples leaks into training."""
    if isinstance(spec, SyntheticData):
        x, y = synthetic(spec)
        classes = spec.classes
        source = (
            f"{spec.kind}: {spec.samples} samples, {spec.features} features, noise {spec.noise} "
            f"(seed {spec.seed})"
        )
    else:
        spec = _files(spec)
        raw = read_files(spec, data_dir)
        x, y, source = raw.x, raw.y, raw.source
        classes = _classes_of(int(y.max()), source)
    train, val, test = split_indices(len(y), spec.split)
    # A copy: standardising in place must not write through to the reader's arrays.
    features = torch.from_numpy(np.array(x, dtype=np.float32))
    labels = torch.from_numpy(np.array(y, dtype=np.int64))
    _standardise(features, train)
    counts = torch.bincount(labels[train], minlength=classes)
    missing = [c for c in range(classes) if not counts[c]]
    note = f"; no training sample of class {', '.join(map(str, missing))}" if missing else ""
    return DataSplits(
        train_x=features[train],
        train_y=labels[train],
        val_x=features[val],
        val_y=labels[val],
        test_x=features[test],
        test_y=labels[test],
        input_shape=tuple(features.shape[1:]),
        classes=classes,
        description=(
            f"{source}; {classes} classes; {len(train)} train / {len(val)} validation / "
            f"{len(test)} test samples (split seed {spec.split.seed}){note}"
        ),
    )


def dataset_geometry(spec: DatasetSpec, data_dir: Path) -> tuple[tuple[int, ...], int, int]:
    """(one sample's shape, classes, samples), refusing what `load_dataset` would refuse, for
    checking a spec where the job is submitted, without holding the data set in memory: a
    generated set is checked by arithmetic and never generated; files are checked by
    dataheaders.py, which reads headers and streams what it must scan (labels, CSV rows) but
    keeps no features. (NaN in an npz feature array shows only when the job loads the set.)"""
    if isinstance(spec, SyntheticData):
        check_synthetic(spec)
        return (spec.features,), spec.classes, spec.samples
    spec = _files(spec)
    geometry = read_geometry(spec, data_dir)
    classes = _classes_of(geometry.top_label, geometry.source)
    split_sizes(geometry.samples, spec.split)
    return geometry.shape, classes, geometry.samples


def _files(spec: FileData | ExternalData) -> FileData:
    if isinstance(spec, ExternalData):
        raise SpecError(_DATASET, "an external run's data is in the user's process, not here")
    return spec


def _classes_of(top_label: int, source: str) -> int:
    classes = top_label + 1
    if classes < 2:
        raise SpecError(_DATASET, f"every label is 0 ({source}): a classifier needs 2 classes")
    return classes


def split_indices(n: int, split: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint index sets (train, validation, test) of a seeded permutation of `range(n)`.
    Each held-out split gets at least one sample when its fraction is above 0."""
    n_val, n_test = split_sizes(n, split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split.seed))
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def split_sizes(n: int, split: Split) -> tuple[int, int]:
    """How many of `n` samples go to validation and to test; the rest train. Raises SpecError
    when no training sample would be left."""
    n_val = max(1, round(n * split.validation))
    n_test = max(1, round(n * split.test)) if split.test > 0 else 0
    if n - n_val - n_test < 1:
        raise SpecError(
            [*_DATASET, "split"],
            f"{n} samples are too few to split into training, validation ({split.validation}) "
            f"and test ({split.test}) sets",
        )
    return n_val, n_test


def _standardise(x: torch.Tensor, train: torch.Tensor) -> None:
    """In place, with the statistics of the rows `train`."""
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    # Images are not scaled to [0, 1] first: per-channel standardisation cancels any scale.
    std, mean = torch.std_mean(x[train], dim=dims, correction=0, keepdim=True)
    x.sub_(mean).div_(torch.where(std > 1e-8, std, torch.ones_like(std)))


# ------------------------------------------------------------- synthetic
def check_synthetic(spec: SyntheticData) -> None:
    """What `synthetic` and `load_dataset` would refuse about a generated set, by arithmetic
    only: the API checks a spec with this, so it never generates the set (a big one takes
    seconds and a gigabyte)."""
    n, classes = spec.samples, spec.classes
    if n * spec.features > MAX_SYNTHETIC_VALUES:
        raise SpecError(
            [*_DATASET, "samples"],
            f"{n} samples × {spec.features} features are more than the "
            f"{MAX_SYNTHETIC_VALUES:,} values a generated set may hold",
        )
    if n < classes:
        raise SpecError([*_DATASET, "samples"], f"{n} samples cannot cover {classes} classes")
    if spec.kind == "checkerboard" and classes != 2:
        raise SpecError([*_DATASET, "classes"], "a checkerboard has 2 classes")
    split_sizes(n, spec.split)


def synthetic(spec: SyntheticData) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Generated samples `[samples, features]` float32 and int64 labels, the classes in turn
    (0, 1, …, 0, 1, …). The same spec always gives the same set.

    - spirals: `classes` arms winding four times around the origin, neighbouring arms
      2 / classes apart, Gaussian noise of std `noise` on each coordinate. Two arms with noise
      0.1–0.2 are more than a 2-8-8-2 tanh MLP can fit, not more than a 64-wide one.
    - moons: two interleaved half circles of radius 1; noise as above.
    - circles: concentric circles of radius 1 (class 0) and 0.5; noise as above.
    - blobs: one Gaussian cluster per class in `features` dimensions, of std `noise` around a
      centre drawn from a standard normal (noise ≳ 0.5 makes clusters overlap).
    - checkerboard: uniform on [-2, 2]², labelled by the colour of its cell in a board of
      `cells` × `cells` (2 classes), then noise as above.
    """
    check_synthetic(spec)
    n, classes, noise = spec.samples, spec.classes, spec.noise
    rng = np.random.default_rng(spec.seed)
    y = np.arange(n) % classes
    if spec.kind == "spirals":
        t = np.sqrt(rng.uniform(0.0, 1.0, n))  # denser further out, where the arms are longer
        angle = 2 * math.pi * (_TURNS * t + y / classes)
        x = 2 * _TURNS * t[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    elif spec.kind == "moons":
        angle = rng.uniform(0.0, math.pi, n)
        outer = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        inner = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
        x = np.where((y == 0)[:, None], outer, inner)
    elif spec.kind == "circles":
        angle = rng.uniform(0.0, 2 * math.pi, n)
        radius = np.where(y == 0, 1.0, 0.5)[:, None]
        x = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    elif spec.kind == "blobs":
        centres = rng.standard_normal((classes, spec.features)).astype(np.float32)
        x = centres[y]
    else:
        x = rng.uniform(-2.0, 2.0, (n, 2))
        cell = 4.0 / spec.cells
        y = (np.floor((x[:, 0] + 2.0) / cell) + np.floor((x[:, 1] + 2.0) / cell)).astype(
            np.int64
        ) % 2
    x = x.astype(np.float32, copy=False)
    x += (noise * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)
    return x, y.astype(np.int64)

"""NPZ files of 1-D sequences (`dataset.sequences`): `x` of shape [N, C, L] reaches a conv1d
model as [C, L] samples, standardised per channel; without the flag a 3-D `x` stays what it
always was, [N, H, W] grayscale images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from esper.contracts.jobs import FileData, JobSpec
from tolaria.datasets import dataset_geometry, load_dataset
from tolaria.errors import SpecError
from tolaria.validation import check_spec

CONV1D_MODEL = {
    "kind": "layers",
    "layers": [
        {"type": "conv1d", "out": 4, "kernel_size": 3},
        {"type": "relu"},
        {"type": "global_avgpool"},
        {"type": "linear", "out": "classes"},
    ],
}


def write_sequences(path: Path, n: int = 60, channels: int = 3, length: int = 16) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(
        loc=[[5.0], [-2.0], [0.0]], scale=[[3.0], [0.5], [1.0]], size=(n, channels, length)
    )
    np.savez(path, x=x.astype(np.float32), y=np.arange(n) % 3)


def test_sequences_reach_the_model_as_channels_by_length(tmp_path: Path) -> None:
    write_sequences(tmp_path / "seq.npz")
    spec = FileData(kind="npz", path="seq.npz", sequences=True)
    data = load_dataset(spec, tmp_path)
    assert data.input_shape == (3, 16) and data.classes == 3
    # Per channel, with the training split's statistics.
    mean = data.train_x.mean(dim=(0, 2))
    std = data.train_x.std(dim=(0, 2), correction=0)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    assert dataset_geometry(spec, tmp_path) == ((3, 16), 3, 60)
    job = JobSpec.model_validate(
        {"model": CONV1D_MODEL, "dataset": spec.model_dump(), "training": {"epochs": 1}}
    )
    check_spec(job, tmp_path)  # a conv1d model fits [C, L] samples


def test_without_the_flag_a_3d_array_is_images_as_before(tmp_path: Path) -> None:
    write_sequences(tmp_path / "seq.npz")
    images = FileData(kind="npz", path="seq.npz")
    assert load_dataset(images, tmp_path).input_shape == (1, 3, 16)
    job = JobSpec.model_validate(
        {"model": CONV1D_MODEL, "dataset": images.model_dump(), "training": {"epochs": 1}}
    )
    with pytest.raises(SpecError, match="sequences"):
        check_spec(job, tmp_path)


def test_sequences_of_the_wrong_rank_or_format_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", x=np.zeros((10, 4), np.float32), y=np.arange(10) % 2)
    flat = FileData(kind="npz", path="flat.npz", sequences=True)
    for probe in (load_dataset, dataset_geometry):
        with pytest.raises(SpecError) as info:
            probe(flat, tmp_path)
        assert info.value.location == ["spec", "dataset", "sequences"]
        assert "[N, C, L]" in info.value.message
    with pytest.raises(ValidationError, match="sequences"):
        FileData(kind="csv", path="table.csv", sequences=True)

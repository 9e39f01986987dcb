"""Checking a spec the way the job will use it, before anything is queued: the data set opens
and fits, the model builds for it, and the layers to wrap exist."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.contracts import JobSpec
from tolaria.datasets import load_dataset
from tolaria.models import build_model, morphable_layers


def check_spec(spec: JobSpec, data_dir: Path) -> None:
    """Raises tolaria.errors.SpecError naming the field at fault."""
    data = load_dataset(spec.dataset, data_dir)
    with torch.device("meta"):  # sizes only: no memory for the weights of a big model
        model = build_model(spec.model, data.input_shape, data.classes)
    if spec.morphogenesis.enabled:
        morphable_layers(model, spec.morphogenesis)

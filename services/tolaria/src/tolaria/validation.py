"""Checking a spec the way the job will use it, before anything is queued: the data set opens
and fits, the model builds for it, the layers to wrap exist, a growth schedule names them, and
the job fits its memory budget.

A spec with the user's code (`kind: python`) is checked the same way, but in a child process
with the code active (usercode.py), never in the API process.

This runs in the API process, so it allocates nothing in proportion to the job: the model is
built on the meta device, a generated data set is checked by arithmetic, never generated, and a
file data set from its headers and streamed labels or rows (dataheaders.py), never loaded; the
pickled CIFAR-10 batches are read by a child process under a memory and a time limit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from esper.contracts import JobSpec
from esper.contracts.jobs import PythonModel
from tolaria.datasets import dataset_geometry
from tolaria.errors import SpecError
from tolaria.memory import check_job_memory, estimate_job_memory
from tolaria.models import build_model, morphable_layers
from tolaria.schedule import check_schedule
from tolaria.settings import TolariaSettings

DEFAULT_MAX_JOB_MEMORY_BYTES = 8 << 30


def check_executor(spec: JobSpec, settings: TolariaSettings) -> None:
    """A job of several workers needs the `ray` executor."""
    workers = spec.distributed.workers
    if workers > 1 and settings.executor != "ray":
        raise SpecError(
            ["spec", "distributed", "workers"],
            f"{workers} workers need Tolaria's `ray` executor (TOLARIA_EXECUTOR=ray, with "
            "TOLARIA_RAY_ADDRESS); this Tolaria trains each job in one local process",
        )


def check_spec(
    spec: JobSpec, data_dir: Path, max_memory_bytes: int = DEFAULT_MAX_JOB_MEMORY_BYTES
) -> None:
    """Raises tolaria.errors.SpecError naming the field at fault."""
    shape, classes, samples = dataset_geometry(spec.dataset, data_dir)
    with torch.device("meta"):  # sizes only: no memory for the weights of a big model
        model = build_model(spec.model, shape, classes)
    layers = morphable_layers(model, spec.morphogenesis) if spec.morphogenesis.enabled else None
    check_schedule(spec, layers)
    if isinstance(spec.model, PythonModel):  # built for real (usercode.py): sized on meta now
        try:
            estimate = estimate_job_memory(model.to("meta"), spec.training, shape, samples)
        except (RuntimeError, NotImplementedError, TypeError):
            # A forward that makes tensors of its own (off the input's device) cannot run on
            # meta: such a model is bounded by MAX_PARAMETERS only.
            return
    else:
        estimate = estimate_job_memory(model, spec.training, shape, samples)
    check_job_memory(estimate, max_memory_bytes)

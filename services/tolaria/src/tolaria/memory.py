"""What a job will hold in memory, estimated from sizes before it is accepted: a spec whose
model, optimizer, activations or data would not fit is refused with 422 instead of failing (or
taking the machine down) once a worker runs it.

The estimate runs the model once on the meta device: every tensor has its shape and no storage,
so a model of any size costs a few milliseconds and no memory to measure. The same code measures
every kind of model (the zoo and declarative layer lists), since it reads the shapes the real
forward produces rather than re-deriving them per kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from esper.contracts.jobs import TrainingSpec
from tolaria.errors import Location, SpecError

FLOAT_BYTES = 4  # models, activations and features are float32
LABEL_BYTES = 8  # labels are int64
EVAL_BATCH = 1024  # evaluation runs in batches of max(batch_size, this), without gradients
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2}  # moments per parameter; sgd: its momentum, if any


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job's process holds at its peak, by what holds them."""

    parameters: int
    """How many parameters the model has."""
    model_bytes: int
    """Parameters, their gradients and the optimizer's state."""
    activation_bytes: int
    """The larger of a training step (every layer's output is kept for the backward pass, plus
    one gradient of the largest) and an evaluation batch (the largest input and output)."""
    data_bytes: int
    """The data set's features and labels."""

    @property
    def total(self) -> int:
        return self.model_bytes + self.activation_bytes + self.data_bytes

    def describe(self) -> str:
        return (
            f"about {_size(self.total)} ({_size(self.model_bytes)} for {self.parameters:,} "
            f"parameters with gradients and optimizer state, {_size(self.activation_bytes)} "
            f"for activations, {_size(self.data_bytes)} for the data)"
        )

    def culprit(self) -> Location:
        """The part of the spec that asks for most of the memory."""
        parts: list[tuple[int, Location]] = [
            (self.model_bytes, ["spec", "model"]),
            (self.activation_bytes, ["spec", "training", "batch_size"]),
            (self.data_bytes, ["spec", "dataset"]),
        ]
        return max(parts, key=lambda part: part[0])[1]


def estimate_job_memory(
    meta_model: nn.Module,
    training: TrainingSpec,
    input_shape: tuple[int, ...],
    samples: int,
) -> MemoryEstimate:
    """`meta_model` is the job's model built on the meta device (see validation.check_spec)."""
    parameters = sum(p.numel() for p in meta_model.parameters())
    states = _OPTIMIZER_STATES.get(training.optimizer, 1 if training.momentum > 0 else 0)
    model_bytes = parameters * (2 + states) * FLOAT_BYTES  # weights, gradients, states
    stored, largest = _activations_per_sample(meta_model, input_shape)
    sample = math.prod(input_shape)
    train = training.batch_size * (sample + stored + largest)
    evaluate = max(training.batch_size, EVAL_BATCH) * (sample + 2 * largest)
    return MemoryEstimate(
        parameters=parameters,
        model_bytes=model_bytes,
        activation_bytes=max(train, evaluate) * FLOAT_BYTES,
        data_bytes=samples * (sample * FLOAT_BYTES + LABEL_BYTES),
    )


def check_job_memory(estimate: MemoryEstimate, budget: int) -> None:
    """Raises SpecError, naming the estimate and the budget, when the job would not fit."""
    if estimate.total > budget:
        raise SpecError(
            estimate.culprit(),
            f"the job would need {estimate.describe()}; this Tolaria allows {_size(budget)} "
            f"({budget:,} bytes) per job (TOLARIA_MAX_JOB_MEMORY_BYTES): use a smaller model, "
            "batch size or data set",
        )


def _activations_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(values every leaf module outputs for one sample, the most any one outputs)."""
    sizes: list[int] = []

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output[0].numel() if output.dim() else 1)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        # Two samples, not one: batch norm refuses a batch of one in training mode.
        with torch.no_grad():
            model(torch.empty((2, *input_shape), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return sum(sizes), max(sizes, default=0)


def _size(value: int) -> str:
    amount = float(value)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.0f} {unit}" if unit == "bytes" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"

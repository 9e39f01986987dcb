"""What a job's model costs: its trainable parameters now and its training FLOPs so far.

Forward FLOPs are counted by PyTorch's FlopCounterMode on one sample, so whatever a seed's
kernel runs is counted as the operators it dispatches; training is estimated at 3 × forward (the
backward pass costs about twice the forward). Counting runs a forward, so it is done once per
model change (a seed joining or leaving), never per step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.kasmina.states import SeedState
from esper.morphable import MorphableModel

TRAIN_FACTOR = 3
"""Forward + backward ≈ 3 × forward: the backward computes gradients for inputs and weights."""


@torch.no_grad()
def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward of `model` on `sample`, a single sample with its batch dimension.
    The model is measured in eval mode (batch norm uses running stats, so one sample is fine)
    and left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def live_seeds(morphable: MorphableModel | None) -> tuple[tuple[str, int, str | None], ...]:
    """The seeds out of DORMANT, with their kernels: when this changes the model's cost does."""
    if morphable is None:
        return ()
    return tuple(
        (info.layer, info.seed, info.kernel_id)
        for info in morphable.seeds()
        if info.state != SeedState.DORMANT
    )


def trainable_parameters(model: nn.Module, morphable: MorphableModel | None) -> int:
    """The host's trainable parameters and those of the seeds out of DORMANT."""
    if morphable is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = {id(p): p for p in morphable.host_parameters() if p.requires_grad}
    for layer, seed, _ in live_seeds(morphable):
        params.update((id(p), p) for p in morphable.seed_parameters(layer, seed) if p.requires_grad)
    return sum(p.numel() for p in params.values())


class ComputeMeter:
    """Training FLOPs so far, charged as samples are trained with the model as it is."""

    def __init__(
        self, model: nn.Module, morphable: MorphableModel | None, sample: torch.Tensor
    ) -> None:
        self.model = model
        self.morphable = morphable
        self.sample = sample[:1]
        self.total = 0.0
        self._seen: tuple[tuple[str, int, str | None], ...] | None = None
        self._per_sample = 0

    def per_sample(self) -> int:
        """Forward FLOPs of one sample with the seeds live now (counted again when they change)."""
        seeds = live_seeds(self.morphable)
        if seeds != self._seen:
            self._per_sample = forward_flops(self.model, self.sample)
            self._seen = seeds
        return self._per_sample

    def charge(self, samples: int) -> None:
        if samples > 0:
            self.total += float(TRAIN_FACTOR * self.per_sample() * samples)

    def parameters(self) -> int:
        return trainable_parameters(self.model, self.morphable)

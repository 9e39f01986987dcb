"""A small task outside Tolaria's zoo, for the tests of a user's own loop (esper.session, the
Lightning callback): three classes of two-channel sinusoids and a tiny Conv1d classifier that
plateaus on them early, where the policy grows it. examples/own_loop.py is the same task as a
user would write it."""

from __future__ import annotations

import math

import torch
from torch import nn

from esper.policy import PolicyConfig

LENGTH = 64
NOISE = 2.0
"""Noisy enough that the tiny model plateaus early."""
SHORT_WINDOWS = PolicyConfig(
    warmup_epochs=2,
    patience=2,
    min_delta=0.01,
    evaluation_epochs=2,
    ramp_steps=10,
    retire_ramp_steps=10,
    cooldown_epochs=1,
    keep_threshold=0.02,
)
"""The short-job values of esper.stack.SHORT_JOB_POLICY with the windows shortened further:
a dozen epochs of this task leave room for a germination and its verdict."""


def sinusoids(
    n: int, generator: torch.Generator, *, length: int = LENGTH, noise: float = NOISE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [n, 2, length]: sin and cos at 3, 5 or 7 cycles (the class, `y`), random phase,
    under Gaussian noise."""
    y = torch.randint(0, 3, (n,), generator=generator)
    t = torch.linspace(0.0, 1.0, length)
    cycles = torch.tensor([3.0, 5.0, 7.0])[y]
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    angle = 2 * math.pi * cycles[:, None] * t[None, :] + phase
    x = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    return x + noise * torch.randn(n, 2, length, generator=generator), y


def conv1d_classifier() -> nn.Sequential:
    """Two Conv1d layers of 4 channels, a global pool, two Linear layers: 3 logits."""
    return nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(4, 4, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )

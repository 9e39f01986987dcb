"""`load(**args) -> (x, y)`: noisy sinusoids, two channels (sin, cos), one class per frequency;
x is `[N, 2, length]`, y the class of each."""

from __future__ import annotations

import math

import torch


def load(
    samples: int = 2000, length: int = 64, noise: float = 2.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (samples,), generator=generator)
    t = torch.linspace(0.0, 1.0, length)
    cycles = torch.tensor([3.0, 5.0, 7.0])[y]
    phase = torch.rand(samples, 1, generator=generator) * 2 * math.pi
    angle = 2 * math.pi * cycles[:, None] * t[None, :] + phase
    x = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    return x + noise * torch.randn(samples, 2, length, generator=generator), y

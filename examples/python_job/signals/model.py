"""`build(input_shape, classes, **args)`: the model of examples/own_loop.py, sized by Tolaria
from the data (`input_shape` is one sample's, `[channels, length]`)."""

from __future__ import annotations

from torch import nn


def build(input_shape: tuple[int, ...], classes: int, width: int = 4) -> nn.Module:
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv1d(channels, width, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(width, 8),
        nn.ReLU(),
        nn.Linear(8, classes),
    )

"""The few building blocks that torch.nn lacks. Typed so that TorchScript can script them."""

from __future__ import annotations

import torch
from torch import nn


class GatedLinearUnit(nn.Module):
    def __init__(self, proj: nn.Module, channel_dim: int) -> None:
        super().__init__()
        self.proj = proj
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=self.channel_dim)
        return a * torch.sigmoid(b)


class SqueezeExcite(nn.Module):
    def __init__(self, width: int, hidden: int, spatial: bool) -> None:
        super().__init__()
        self.reduce = nn.Linear(width, hidden)
        self.expand = nn.Linear(hidden, width)
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3)) if self.spatial else x
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(pooled))))
        if self.spatial:
            gate = gate[:, :, None, None]
        return x * gate


class ChannelScale(nn.Module):
    def __init__(self, width: int, init: float, spatial: bool) -> None:
        super().__init__()
        shape = (width, 1, 1) if spatial else (width,)
        self.scale = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)

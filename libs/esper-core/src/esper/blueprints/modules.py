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
    """`spatial_dims`: 0 on [B, C], 1 on [B, C, L], 2 on [B, C, H, W] (pooled over them)."""

    def __init__(self, width: int, hidden: int, spatial_dims: int) -> None:
        super().__init__()
        self.reduce = nn.Linear(width, hidden)
        self.expand = nn.Linear(hidden, width)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:
            pooled = x.mean(dim=(2, 3))
        elif self.spatial_dims == 1:
            pooled = x.mean(dim=2)
        else:
            pooled = x
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(pooled))))
        if self.spatial_dims == 2:
            gate = gate[:, :, None, None]
        elif self.spatial_dims == 1:
            gate = gate[:, :, None]
        return x * gate


class ChannelScale(nn.Module):
    """A per-channel scale of [B, C] (`spatial_dims` 0), [B, C, L] (1) or [B, C, H, W] (2)."""

    def __init__(self, width: int, init: float, spatial_dims: int) -> None:
        super().__init__()
        shape = (width,) + (1,) * spatial_dims
        self.scale = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)

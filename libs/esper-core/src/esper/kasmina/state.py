"""Seed states, blend modes and the per-layer StateLayout (structure of arrays)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina.states import RUNNING_STATES, BlendMode, SeedState

__all__ = ["RUNNING_STATES", "BlendMode", "SeedState", "StateLayout"]


class StateLayout(nn.Module):
    """Per-seed numeric state of one layer as registered buffers: `.to()` and checkpoints carry it.

    The buffers are written only through LifecycleManager / KasminaLayer. Forward never reads them
    to decide what runs (that would need a host-device sync); the Python mirrors in KasminaLayer do.
    `contribution` is NaN until measured: missing must read as missing, never as zero.
    """

    state: torch.Tensor
    alpha: torch.Tensor
    steps_in_state: torch.Tensor
    error_count: torch.Tensor
    contribution: torch.Tensor

    def __init__(self, num_seeds: int) -> None:
        super().__init__()
        self.num_seeds = num_seeds
        self.register_buffer("state", torch.zeros(num_seeds, dtype=torch.int8))
        self.register_buffer("alpha", torch.zeros(num_seeds, dtype=torch.float32))
        self.register_buffer("steps_in_state", torch.zeros(num_seeds, dtype=torch.int64))
        self.register_buffer("error_count", torch.zeros(num_seeds, dtype=torch.int64))
        self.register_buffer("contribution", torch.full((num_seeds,), float("nan")))

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> StateLayout:
        """Move with the model (`.to(device)`, `.cuda()`) but keep each buffer's dtype: a model
        cast to half or bfloat16 must not round α (0.7 → 0.7002) away from the Python mirror the
        lerp budget is checked against, nor touch the int8 state or a NaN contribution."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return f"num_seeds={self.num_seeds}"

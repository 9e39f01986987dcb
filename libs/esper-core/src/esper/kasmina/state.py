"""A seed slot's state, in two halves: the per-layer StateLayout (numeric state as buffers, a
structure of arrays that `.to()` and checkpoints carry) and one SeedSlot record per slot (the
Python-side state forward decides from, with no device read)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from esper.exceptions import SeedIndexError
from esper.kasmina.schedule import AlphaRamp
from esper.kasmina.states import RUNNING_STATES, BlendMode, SeedState

__all__ = [
    "RUNNING_STATES",
    "BlendMode",
    "SeedCall",
    "SeedSlot",
    "SeedState",
    "StateLayout",
    "check_seed_index",
]

# A seed's bound forward: see SeedSlot.call.
SeedCall = Callable[[torch.Tensor], torch.Tensor]


def check_seed_index(layer: str, seed: object, num_seeds: int) -> int:
    """`seed` as a slot index of a layer with `num_seeds` slots, or SeedIndexError. A negative
    index would silently alias another slot through Python list indexing, and a bool is no index."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < num_seeds:
        raise SeedIndexError(layer, seed, num_seeds)  # type: ignore[arg-type]
    return seed


@dataclass
class SeedSlot:
    """The Python side of one seed slot. Each field has one writer, so it cannot drift from the
    layout buffer it mirrors:

    - `state`: LifecycleManager.transition (with `StateLayout.state`);
    - `alpha`: KasminaLayer._write_alpha (with `StateLayout.alpha`); forward reads α from here;
    - `contribution`: KasminaLayer._write_contribution, behind record_contribution (with
      `StateLayout.contribution`): the exact value measured, which the float32 buffer would
      round; NaN until measured;
    - `call`: the bound forward of the slot's module, derived by KasminaLayer._seat from the one
      copy of the module, registered in `KasminaLayer.seeds`;
    - the rest: KasminaLayer. The error count has no mirror: `StateLayout.error_count` is the
      only count.

    A fresh record is an empty slot; KasminaLayer._reset_slot returns a slot to one.
    """

    state: SeedState = SeedState.DORMANT
    alpha: float = 0.0
    contribution: float = math.nan
    kernel_id: str | None = None
    blend: BlendMode = BlendMode.ADD
    grad_isolation: bool = False
    # A widening seed: its output goes to the layer's downstream layer (KasminaLayer.downstream),
    # not into this layer's own output.
    widens: bool = False
    # Seeds are called through their bound forward: nn.Module.__call__ (hooks, and for an exported
    # GraphModule its call wrapper) costs ~100 µs a call, more than a small seed's compute. Hooks
    # registered on a seed module therefore do not run.
    call: SeedCall | None = None
    ramp: AlphaRamp | None = None
    last_error: str | None = None

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ would find two unmeasured slots unequal: NaN ≠ NaN.
        if not isinstance(other, SeedSlot):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            both_nan = (
                isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
            )
            if a != b and not both_nan:
                return False
        return True


class StateLayout(nn.Module):
    """Per-seed numeric state of one layer as registered buffers: `.to()` and checkpoints carry it.

    Created on its host layer's device, and moved with the model. The buffers are written only
    through LifecycleManager (`state`, and `steps_in_state` zeroed on each transition) and
    KasminaLayer (`steps_in_state` aged by advance(), `alpha` by _write_alpha, `contribution` by
    _write_contribution, `error_count` counted in forward and zeroed by _reset_slot). Forward
    never reads them to decide what runs (that would need a host-device sync); the SeedSlot
    records of KasminaLayer hold what it decides from.
    `contribution` is NaN until measured: missing must read as missing, never as zero.
    """

    state: torch.Tensor
    alpha: torch.Tensor
    steps_in_state: torch.Tensor
    error_count: torch.Tensor
    contribution: torch.Tensor

    def __init__(self, num_seeds: int, device: torch.device | str | None = None) -> None:
        """`device`: where the buffers live; None takes torch's default (`with torch.device()`)."""
        super().__init__()
        self.num_seeds = num_seeds
        self.register_buffer("state", torch.zeros(num_seeds, dtype=torch.int8, device=device))
        self.register_buffer("alpha", torch.zeros(num_seeds, dtype=torch.float32, device=device))
        self.register_buffer(
            "steps_in_state", torch.zeros(num_seeds, dtype=torch.int64, device=device)
        )
        self.register_buffer(
            "error_count", torch.zeros(num_seeds, dtype=torch.int64, device=device)
        )
        self.register_buffer("contribution", torch.full((num_seeds,), math.nan, device=device))

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

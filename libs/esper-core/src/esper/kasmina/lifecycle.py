"""The seed lifecycle: legal edges, the one writer of seed state, and the events it emits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from esper.exceptions import IllegalTransitionError
from esper.kasmina.state import StateLayout, check_seed_index
from esper.kasmina.states import LEGAL_TRANSITIONS, SeedState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LifecycleEvent:
    """One seed transition; the bus carries it as an `event.seed_transition` message."""

    layer: str
    seed: int
    from_state: SeedState
    to_state: SeedState
    reason: str
    kernel_id: str | None
    ts: float = field(default_factory=time.time)


Listener = Callable[[LifecycleEvent], None]


class StateMirror(Protocol):
    """The Python-side states forward reads: a list, or KasminaLayer's view of its slot records."""

    def __len__(self) -> int: ...
    def __getitem__(self, seed: int, /) -> SeedState: ...
    def __setitem__(self, seed: int, state: SeedState, /) -> None: ...


class LifecycleManager:
    """Validates and applies every state change of one layer's seeds, and reports each one."""

    def __init__(self, layer_name: str, layout: StateLayout, mirror: StateMirror) -> None:
        self.layer_name = layer_name
        self._layout = layout
        self._mirror = mirror  # the Python-side copy that forward reads
        self.listeners: list[Listener] = []

    def state(self, seed: int) -> SeedState:
        return self._mirror[seed]

    def check(self, seed: int, to_state: SeedState) -> None:
        check_seed_index(self.layer_name, seed, len(self._mirror))
        current = self._mirror[seed]
        if to_state not in LEGAL_TRANSITIONS[current]:
            allowed = ", ".join(s.name for s in sorted(LEGAL_TRANSITIONS[current]))
            raise IllegalTransitionError(
                f"seed {seed} of layer {self.layer_name!r}: {current.name} → {to_state.name} "
                f"is not a lifecycle edge (from {current.name}: {allowed})"
            )

    def transition(
        self, seed: int, to_state: SeedState, reason: str, kernel_id: str | None = None
    ) -> LifecycleEvent:
        self.check(seed, to_state)
        from_state = self._mirror[seed]
        self._mirror[seed] = to_state
        # Plain index writes: a host-to-device copy on CUDA, never a sync.
        self._layout.state[seed] = int(to_state)
        self._layout.steps_in_state[seed] = 0
        event = LifecycleEvent(self.layer_name, seed, from_state, to_state, reason, kernel_id)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break training
                log.exception("lifecycle listener failed on %s", event)
        return event

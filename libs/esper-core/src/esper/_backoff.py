"""Exponential backoff with jitter: the one retry timing of the bus's reconnects and of the HTTP
calls to Urza."""

from __future__ import annotations

import random

from esper.exceptions import ConfigError

#: Beyond this many doublings the ceiling is the cap anyway; the bound keeps 2**n a small int.
_MAX_DOUBLINGS = 30


class Backoff:
    """The delay before retry n (n = 0 for the first retry) is drawn uniformly from
    [floor_s, min(cap_s, base_s · 2ⁿ)].

    Jitter keeps a fleet of clients from retrying in lockstep when a server comes back. A floor
    of 0 is "full jitter"; a floor of `base_s` never retries sooner than `base_s`. `next_delay()`
    counts the attempts itself (`reset()` after a success); `delay(n)` serves a caller that
    counts its own.
    """

    def __init__(self, base_s: float, cap_s: float, *, floor_s: float = 0.0) -> None:
        if not 0 <= floor_s <= base_s <= cap_s:
            raise ConfigError(
                f"backoff needs 0 <= floor_s <= base_s <= cap_s, got {floor_s}, {base_s}, {cap_s}"
            )
        self.base_s = base_s
        self.cap_s = cap_s
        self.floor_s = floor_s
        self.attempts = 0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(attempt, _MAX_DOUBLINGS))
        return random.uniform(self.floor_s, max(self.floor_s, ceiling))

    def next_delay(self) -> float:
        delay = self.delay(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0

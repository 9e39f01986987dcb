"""Seed states, blend modes and the legal lifecycle edges: plain data, no torch, so that the
contracts (and any process that only reads them) can use them without loading torch."""

from __future__ import annotations

import enum


class SeedState(enum.IntEnum):
    DORMANT = 0
    ALLOCATED = 1
    LOADING = 2
    ACTIVE = 3
    RETIRING = 4
    RECYCLING = 5


# A seed in one of these states runs in forward; every other state takes the dormant fast path.
RUNNING_STATES = frozenset({SeedState.ACTIVE, SeedState.RETIRING})


class BlendMode(enum.StrEnum):
    ADD = "add"  # grows capacity; function-preserving at α = 0
    LERP = "lerp"  # replaces the host's computation by the kernel's as α → 1


S = SeedState
LEGAL_TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    S.DORMANT: frozenset({S.ALLOCATED}),
    S.ALLOCATED: frozenset({S.LOADING, S.DORMANT}),  # → DORMANT: allocation abandoned
    S.LOADING: frozenset({S.ACTIVE, S.DORMANT}),  # → DORMANT: load failed
    S.ACTIVE: frozenset({S.RETIRING}),  # errors, NaN, poor contribution, or asked to
    S.RETIRING: frozenset({S.RECYCLING}),
    S.RECYCLING: frozenset({S.DORMANT}),
}

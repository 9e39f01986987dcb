"""The shared vocabulary of Esper: the field types and the closed sets of names that every
contract, service and client uses. One definition of each, so every topic agrees on its bounds
and no service keeps a copy that can drift.

Integers stop at 2**53 - 1 because a JSON consumer in another language may read numbers as
doubles; beyond that an id or a count would silently change.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, cast, get_args

from pydantic import AfterValidator, Field

from esper.kasmina.states import RUNNING_STATES

MAX_SAFE_INT = 2**53 - 1

KERNEL_ID_RE = re.compile(r"^krn_[0-9a-f]{24}$")

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
"""A job, decision or instance id: safe in a Redis key, a URL path and a metric label."""

LayerName = Annotated[str, Field(min_length=1, max_length=256)]
"""A wrapped layer's dotted `named_modules()` name, e.g. `features.0`."""

SeedIndex = Annotated[int, Field(ge=0, le=1023)]
KernelId = Annotated[str, Field(pattern=KERNEL_ID_RE.pattern)]
BlueprintName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{1,63}$")]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
"""A kernel reference: a tag, or a kernel id (which has the same alphabet)."""


def _not_a_kernel_id(tag: str) -> str:
    if KERNEL_ID_RE.fullmatch(tag):
        raise ValueError("a tag must not look like a kernel id (krn_ + 24 hex digits)")
    return tag


KernelTag = Annotated[Tag, AfterValidator(_not_a_kernel_id)]
"""A name given to a kernel (`efficiency_kernel_v1`): never shaped like an id, so a reference
is unambiguous."""
ServiceName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$")]

Count = Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
"""A fraction or an α: a value in [0, 1]."""
NonNegative = Annotated[float, Field(ge=0.0)]
Timestamp = Annotated[float, Field(ge=0.0)]
"""Seconds since the Unix epoch."""

Reason = Annotated[str, Field(min_length=1, max_length=2000)]
"""Why something happened, for a person reading a log or a dashboard."""
Text = Annotated[str, Field(max_length=2000)]

SeedStateName = Literal["DORMANT", "ALLOCATED", "LOADING", "ACTIVE", "RETIRING", "RECYCLING"]
"""`esper.kasmina.SeedState` by name: names survive a renumbering, ints would not. Spelled out
rather than derived from the enum so that type checkers see the names; a test holds the two
equal, in order."""
SEED_STATE_NAMES: tuple[SeedStateName, ...] = get_args(SeedStateName)
"""Every seed state, in `SeedState`'s order (DORMANT first)."""
RUNNING_SEED_STATES: frozenset[SeedStateName] = frozenset(
    cast(SeedStateName, s.name) for s in RUNNING_STATES
)
"""The states in which a seed's kernel runs in the host's forward (and its parameters count)."""

Blend = Literal["add", "lerp"]
Action = Literal["germinate", "keep", "retire", "set_alpha"]
Outcome = Literal["applied", "refused"]
"""How a job answered a ControlDecision (`event.decision_taken`)."""

JobStatus = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
"""Every job status, in the order of a job's life (PENDING first)."""
TERMINAL_JOB_STATUSES: frozenset[JobStatus] = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
"""The statuses a job ends in: it never leaves one of them."""

HealthState = Literal["ok", "degraded", "down"]
KernelFormat = Literal["export", "torchscript"]

Key = Annotated[str, Field(min_length=1, max_length=128)]
Scalar = Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)] | float | Text | None
"""A free-form value in evidence: a number, a short string, or missing."""
Detail = bool | Scalar
"""A value in a heartbeat's details: a Scalar, or a flag such as `"redis": true`."""


def clip(text: str, limit: int = 2000) -> str:
    """Shorten free text (an error message, say) to fit a Reason field rather than fail on it."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "JOB_STATUSES",
    "KERNEL_ID_RE",
    "MAX_SAFE_INT",
    "RUNNING_SEED_STATES",
    "SEED_STATE_NAMES",
    "TERMINAL_JOB_STATUSES",
    "Action",
    "Blend",
    "BlueprintName",
    "Count",
    "Detail",
    "Digest",
    "HealthState",
    "Identifier",
    "JobStatus",
    "KernelFormat",
    "KernelId",
    "KernelTag",
    "Key",
    "LayerName",
    "NonNegative",
    "Outcome",
    "Reason",
    "Scalar",
    "SeedIndex",
    "SeedStateName",
    "ServiceName",
    "Tag",
    "Text",
    "Timestamp",
    "Unit",
    "clip",
]

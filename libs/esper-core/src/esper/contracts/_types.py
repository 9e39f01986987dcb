"""Field types shared by the contracts: one definition of each bound, so every topic agrees.

Integers stop at 2**53 - 1 because a JSON consumer in another language may read numbers as
doubles; beyond that an id or a count would silently change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from esper.kernels.artifact import KERNEL_ID_RE

MAX_SAFE_INT = 2**53 - 1

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
"""`esper.kasmina.SeedState` by name: names survive a renumbering, ints would not."""
Blend = Literal["add", "lerp"]
Action = Literal["germinate", "keep", "retire", "set_alpha"]
JobStatus = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
HealthState = Literal["ok", "degraded", "down"]

Key = Annotated[str, Field(min_length=1, max_length=128)]
Scalar = Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)] | float | Text | None
"""A free-form value in evidence: a number, a short string, or missing."""
Detail = bool | Scalar
"""A value in a heartbeat's details: a Scalar, or a flag such as `"redis": true`."""


def when(field: str, condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema `if/then` on one field, so that a model validator's rule is also in proto/
    for readers that are not pydantic."""
    return {
        "if": {"properties": {field: condition}, "required": [field]},
        "then": then,
    }


def fields_are(**schemas: dict[str, Any]) -> dict[str, Any]:
    """The `then` half of `when`: what the named fields must be."""
    return {"properties": schemas}


NULL: dict[str, Any] = {"type": "null"}


class Part(BaseModel):
    """Base of the records nested in a message: the same rules as `Message`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def clip(text: str, limit: int = 2000) -> str:
    """Shorten free text (an error message, say) to fit a Reason field rather than fail on it."""
    return text if len(text) <= limit else text[: limit - 1] + "…"

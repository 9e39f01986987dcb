"""HTTP bodies every service shares: the one error shape, health and readiness, and a page.

These are not bus messages (nothing registers them); they are here so that a client of any of the
four services parses errors, probes and listings with the same code.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from esper.contracts.vocabulary import Count, HealthState, Key, ServiceName

T = TypeVar("T")

Check = bool | Annotated[str, Field(max_length=500)]
"""A probe's result: True passes; False, or a string saying what is wrong, fails."""


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ErrorInfo(Body):
    type: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="a stable machine-readable kind: validation_error, not_found, conflict, …",
    )
    message: str = Field(max_length=4000, description="for a person: what is wrong and where")
    location: list[str | int] | None = Field(
        default=None, max_length=32, description="path to the offending input: body, spec, epochs"
    )
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(Body):
    """`{"error": {type, message, location, details}}`: every 4xx and 5xx of every service."""

    error: ErrorInfo

    @classmethod
    def of(
        cls,
        type: str,
        message: str,
        location: list[str | int] | None = None,
        **details: Any,
    ) -> ErrorBody:
        return cls(error=ErrorInfo(type=type, message=message, location=location, details=details))


def _failing(checks: dict[str, Check]) -> list[str]:
    return sorted(name for name, result in checks.items() if result is not True)


class HealthStatus(Body):
    """`GET /healthz`: the process is alive; `ok` only when every check passes."""

    status: HealthState
    service: ServiceName
    version: str = Field(min_length=1, max_length=64)
    checks: dict[Key, Check] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _ok_means_ok(self) -> HealthStatus:
        failing = _failing(self.checks)
        if self.status == "ok" and failing:
            raise ValueError(f"status is ok but checks fail: {', '.join(failing)}")
        return self


class Readiness(Body):
    """`GET /readyz`: ready to take traffic (Redis reachable, consumers alive, …). The status
    follows from the checks, so a caller can trust either."""

    status: Literal["ready", "not_ready"]
    service: ServiceName
    version: str = Field(min_length=1, max_length=64)
    checks: dict[Key, Check] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _status_follows_checks(self) -> Readiness:
        expected = "not_ready" if _failing(self.checks) else "ready"
        if self.status != expected:
            raise ValueError(f"status must be {expected} for these checks")
        return self

    @classmethod
    def of(cls, service: str, version: str, checks: dict[str, Check]) -> Readiness:
        status: Literal["ready", "not_ready"] = "not_ready" if _failing(checks) else "ready"
        return cls(status=status, service=service, version=version, checks=checks)


class Page(Body, Generic[T]):
    """One page of a listing; pass `next_cursor` back to get the next (null: this was the last).
    `total` is null when counting would cost more than the page."""

    items: list[T] = Field(max_length=1000)
    next_cursor: str | None = Field(default=None, min_length=1, max_length=512)
    total: Count | None = None

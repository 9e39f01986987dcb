"""Events: facts that happened — seed transitions, job status changes, kernels published,
decisions executed. Consumers count and display them; nobody asks for them to happen."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, cast, get_args

from pydantic import ConfigDict, Field, model_validator

from esper.contracts._types import (
    Action,
    BlueprintName,
    Count,
    Digest,
    Identifier,
    JobStatus,
    KernelId,
    LayerName,
    Reason,
    SeedIndex,
    SeedStateName,
    Tag,
    Text,
    Timestamp,
    clip,
    fields_are,
    when,
)
from esper.contracts.envelope import Message, register
from esper.kasmina.states import LEGAL_TRANSITIONS, SeedState

if TYPE_CHECKING:
    from esper.kasmina.lifecycle import LifecycleEvent
from esper.kernels.artifact import KernelFormat, KernelMeta
from esper.signature import HostSignature


def _name(state: SeedState) -> SeedStateName:
    return cast(SeedStateName, state.name)


@register
class SeedTransition(Message):
    """One lifecycle edge of one seed slot, as the LifecycleManager applied it."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when(
                    "from_state",
                    {"const": source.name},
                    fields_are(to_state={"enum": sorted(t.name for t in targets)}),
                )
                for source, targets in LEGAL_TRANSITIONS.items()
            ]
        }
    )

    TYPE: ClassVar[str] = "event.seed_transition"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "events"

    job_id: Identifier
    layer: LayerName
    seed: SeedIndex
    from_state: SeedStateName
    to_state: SeedStateName
    reason: Reason
    kernel_id: KernelId | None = None
    step: Count | None = Field(default=None, description="training step; null if not stepping")
    occurred_at: Timestamp | None = None

    @model_validator(mode="after")
    def _legal(self) -> SeedTransition:
        if SeedState[self.to_state] not in LEGAL_TRANSITIONS[SeedState[self.from_state]]:
            raise ValueError(f"{self.from_state} → {self.to_state} is not a lifecycle edge")
        return self

    @classmethod
    def from_lifecycle(
        cls, event: LifecycleEvent, job_id: str, step: int | None = None
    ) -> SeedTransition:
        """The bus form of a Kasmina lifecycle event (a long error reason is shortened)."""
        return cls(
            job_id=job_id,
            layer=event.layer,
            seed=event.seed,
            from_state=_name(event.from_state),
            to_state=_name(event.to_state),
            reason=clip(event.reason) or "(no reason given)",
            kernel_id=event.kernel_id,
            step=step,
            occurred_at=event.ts,
        )


@register
class JobStatusChanged(Message):
    """A training job moved from `previous` (null: just submitted) to `status`."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when("status", {"const": s}, fields_are(previous={"not": {"const": s}}))
                for s in get_args(JobStatus)
            ]
        }
    )

    TYPE: ClassVar[str] = "event.job_status"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "events"

    job_id: Identifier
    status: JobStatus
    previous: JobStatus | None = None
    error: Text | None = Field(default=None, description="why the job failed or stopped")
    attempt: int = Field(
        default=1, ge=1, le=1000, description="1, plus the times a worker picked the job up again"
    )

    @model_validator(mode="after")
    def _changed(self) -> JobStatusChanged:
        if self.status == self.previous:
            raise ValueError(f"status and previous are both {self.status}: nothing changed")
        return self


@register
class KernelReady(Message):
    """Urza published a kernel: compiled from a blueprint, or uploaded after training."""

    TYPE: ClassVar[str] = "event.kernel_ready"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "events"

    kernel_id: KernelId
    name: str = Field(min_length=1, max_length=128)
    blueprint: BlueprintName | None = None
    format: KernelFormat
    host: HostSignature
    digest: Digest
    params: Count
    flops: Count
    tags: list[Tag] = Field(default_factory=list, max_length=64)

    @classmethod
    def from_meta(cls, meta: KernelMeta, tags: list[str] | None = None) -> KernelReady:
        return cls(
            kernel_id=meta.kernel_id,
            name=meta.name,
            blueprint=meta.blueprint,
            format=meta.format,
            host=meta.host,
            digest=meta.digest,
            params=meta.params,
            flops=meta.flops,
            tags=list(tags or []),
        )


@register
class DecisionTaken(Message):
    """A job's answer to a ControlDecision: applied (to `layer`/`seed`) or refused, and why."""

    TYPE: ClassVar[str] = "event.decision_taken"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "events"

    decision_id: Identifier
    job_id: Identifier
    action: Action
    outcome: Literal["applied", "refused"]
    reason: Reason
    layer: LayerName
    seed: SeedIndex | None = Field(default=None, description="the slot used; null if none was")

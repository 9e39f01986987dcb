"""Events: facts that happened — seed transitions, job status changes, kernels published,
decisions executed. Consumers count and display them; nobody asks for them to happen."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal, Self, cast, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from esper.contracts._schema import fields_are, when
from esper.contracts.envelope import Message, register
from esper.contracts.jobs import JobMetrics, JobView
from esper.contracts.kernels import MAX_HOST_FEATURES, HostSignature, KernelMeta, Pair
from esper.contracts.vocabulary import (
    TERMINAL_JOB_STATUSES,
    Action,
    BlueprintName,
    Count,
    Digest,
    Identifier,
    JobStatus,
    KernelFormat,
    KernelId,
    LayerName,
    Outcome,
    Reason,
    SeedIndex,
    SeedStateName,
    Tag,
    Text,
    Timestamp,
    clip,
)
from esper.kasmina.states import LEGAL_TRANSITIONS, SeedState

if TYPE_CHECKING:
    from esper.contracts.control import ControlDecision
    from esper.kasmina.lifecycle import LifecycleEvent


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
class DecisionPointMissed(Message):
    """A job's decision point went unanswered, and the job went on without decisions there:
    no controller answered within `morphogenesis.decision_timeout_s` (`timeout`), or none was
    alive to ask (`no_controller`: no heartbeat of one on the health topic). An answer that
    comes later is not applied: a job applies decisions only at the point they answer."""

    TYPE: ClassVar[str] = "event.decision_point_missed"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "events"

    job_id: Identifier
    epoch: Count
    step: Count
    kind: Literal["epoch", "step"]
    reason: Literal["timeout", "no_controller"]
    waited_s: float = Field(ge=0.0, le=86_400.0)


_STATUS_CHANGES: list[JsonValue] = [
    when("status", {"const": s}, fields_are(previous={"not": {"const": s}}))
    for s in get_args(JobStatus)
]
"""The schema's form of "a status change changes the status"."""


class _JobStatusFields(Message):
    """What every version of `event.job_status` carries."""

    model_config = ConfigDict(json_schema_extra={"allOf": _STATUS_CHANGES})

    TYPE: ClassVar[str] = "event.job_status"
    TOPIC: ClassVar[str] = "events"

    job_id: Identifier
    status: JobStatus
    previous: JobStatus | None = None
    error: Text | None = Field(default=None, description="why the job failed or stopped")
    attempt: int = Field(
        default=1, ge=1, le=1000, description="1, plus the times a worker picked the job up again"
    )

    @model_validator(mode="after")
    def _changed(self) -> Self:
        if self.status == self.previous:
            raise ValueError(f"status and previous are both {self.status}: nothing changed")
        return self


@register
class JobStatusChangedV1(_JobStatusFields):
    """`event.job_status` v1: no metrics. Still read, from a Tolaria not yet upgraded;
    `upgrade()` gives the current JobStatusChanged, with no metrics."""

    VERSION: ClassVar[int] = 1

    def upgrade(self) -> JobStatusChanged:
        return JobStatusChanged(**self.model_dump())


@register
class JobStatusChanged(_JobStatusFields):
    """A training job moved from `previous` (null: just submitted) to `status`; a job that ended
    says what it measured last and at its best validation epoch."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                *_STATUS_CHANGES,
                when(
                    "status",
                    {"enum": sorted(set(get_args(JobStatus)) - TERMINAL_JOB_STATUSES)},
                    fields_are(metrics={"type": "null"}),
                ),
            ]
        }
    )

    VERSION: ClassVar[int] = 2

    metrics: JobMetrics | None = Field(
        default=None,
        description="the job's final metrics, on SUCCEEDED (and STOPPED/FAILED when any were "
        "measured): the last epoch's (`test_*` with the last weights) and the best "
        "validation epoch's (`best_*`); null while the job has not ended",
    )

    @model_validator(mode="after")
    def _final_only(self) -> JobStatusChanged:
        if self.metrics is not None and self.status not in TERMINAL_JOB_STATUSES:
            raise ValueError(f"only an ended job has final metrics, not a {self.status} one")
        return self

    @classmethod
    def ended(cls, view: JobView) -> JobStatusChanged:
        """The event of a job's end, from its record as it was written: its status, error,
        attempt, and metrics unless nothing was measured (all null would read as measured)."""
        measured = view.metrics != JobMetrics()
        return cls(
            job_id=view.job_id,
            status=view.status,
            previous="RUNNING",
            error=view.error,
            attempt=max(1, view.attempt),
            metrics=view.metrics if measured else None,
        )


class HostSignatureV1(BaseModel):
    """A kernel's host as `event.kernel_ready` v1 carries it: one layer (no `downstream`), with
    the geometry rules of `HostSignature`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["linear", "conv2d"]
    in_features: int = Field(ge=1, le=MAX_HOST_FEATURES)
    out_features: int = Field(ge=1, le=MAX_HOST_FEATURES)
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair | Literal["same"] = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> HostSignatureV1:
        # The rules are HostSignature's, checked by it, so the two cannot drift apart.
        try:
            self.upgrade()
        except ValidationError as err:
            raise ValueError("; ".join(_bare(e["msg"]) for e in err.errors())) from None
        return self

    def upgrade(self) -> HostSignature:
        return HostSignature(**self.model_dump())


def _bare(message: str) -> str:
    """A nested model validator's message without the "Value error, " that pydantic puts before
    it, which the outer one would repeat."""
    return message.removeprefix("Value error, ")


class _KernelFields(Message):
    """What every version of `event.kernel_ready` carries."""

    TYPE: ClassVar[str] = "event.kernel_ready"
    TOPIC: ClassVar[str] = "events"

    kernel_id: KernelId
    name: str = Field(min_length=1, max_length=128)
    blueprint: BlueprintName | None = None
    format: KernelFormat
    # Each version names the host signature it carries: v2 added widening hosts.
    host: HostSignature | HostSignatureV1
    digest: Digest
    params: Count
    flops: Count
    tags: list[Tag] = Field(default_factory=list, max_length=64)


@register
class KernelReadyV1(_KernelFields):
    """`event.kernel_ready` v1: its host is one layer, never a widening host. Still read, from
    an Urza not yet upgraded; `upgrade()` gives the current KernelReady."""

    VERSION: ClassVar[int] = 1

    host: HostSignatureV1

    def upgrade(self) -> KernelReady:
        return KernelReady(**self.model_dump())


@register
class KernelReady(_KernelFields):
    """Urza published a kernel: compiled from a blueprint, or uploaded after training."""

    VERSION: ClassVar[int] = 2

    host: HostSignature

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


RefusalCode = Literal[
    "wrong_job",
    "unknown_layer",
    "invalid_seed",
    "seed_state",
    "morphogenesis_off",
    "no_free_slot",
    "max_seeds",
    "kernel_unavailable",
    "kernel_unreachable",
    "load_failed",
    "alpha_rejected",
    "job_finished",
    "internal",
]
"""Why a job refused a ControlDecision, for a program to act on (the reason is for people):

- `wrong_job`: the decision names another job.
- `unknown_layer`: the model wraps no layer of that name.
- `invalid_seed`: the action needs a seed and none was named, or the index is out of range.
- `seed_state`: the named seed is not in a state the action applies to (retire, keep and
  set_alpha need an ACTIVE seed; a germination into a named slot needs it DORMANT).
- `morphogenesis_off`: the job does not grow seeds at all.
- `no_free_slot`: a germination found no DORMANT slot in the layer.
- `max_seeds`: the job already holds its `max_seeds`.
- `kernel_unavailable`: no kernel could be had for the blueprint (compile or fetch failed).
- `kernel_unreachable`: no kernel could be had because Urza (or every store holding the kernel)
  could not be reached, or kept answering "not now", until the decision's time was up
  (`MorphogenesisSpec.kernel_retry_s`): nothing is wrong with the blueprint; decide again later.
- `load_failed`: the kernel was had but could not be loaded into the slot.
- `alpha_rejected`: α cannot go where asked (the layer's lerp budget, say).
- `job_finished`: the job stopped training before it got to the decision.
- `internal`: anything else, a bug included.
"""
REFUSAL_CODES: tuple[RefusalCode, ...] = get_args(RefusalCode)
TRANSIENT_REFUSALS: frozenset[RefusalCode] = frozenset({"kernel_unreachable"})
"""The refusals that say "not now" rather than "no": the same decision may be applied later, so
a controller charges nobody for them (see `DecisionTaken.transient`)."""


class _DecisionAnswer(Message):
    """What every version of `event.decision_taken` carries."""

    TYPE: ClassVar[str] = "event.decision_taken"
    TOPIC: ClassVar[str] = "events"

    decision_id: Identifier
    job_id: Identifier
    action: Action
    outcome: Outcome
    reason: Reason
    layer: LayerName
    seed: SeedIndex | None = Field(default=None, description="the slot used; null if none was")


@register
class DecisionTaken(_DecisionAnswer):
    """A job's answer to a ControlDecision: applied (to `layer`/`seed`) or refused, and why.

    A refusal carries a `code` (closed set) for programs, and `reason` in words for people: a
    consumer that acts on a refusal switches on the code, so rewording a reason changes nothing.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when(
                    "outcome",
                    {"const": "refused"},
                    {**fields_are(code={"enum": list(REFUSAL_CODES)}), "required": ["code"]},
                ),
                when("outcome", {"const": "applied"}, fields_are(code={"type": "null"})),
            ]
        }
    )

    VERSION: ClassVar[int] = 2

    code: RefusalCode | None = Field(
        default=None, description="why it was refused; set exactly when outcome is refused"
    )

    @model_validator(mode="after")
    def _code_iff_refused(self) -> DecisionTaken:
        if self.outcome == "refused" and self.code is None:
            raise ValueError("a refused decision needs a code")
        if self.outcome == "applied" and self.code is not None:
            raise ValueError(f"an applied decision has no refusal code (got {self.code!r})")
        return self

    @property
    def transient(self) -> bool:
        """Refused for a cause that may pass (its code is in TRANSIENT_REFUSALS): deciding the
        same again later may succeed."""
        return self.code in TRANSIENT_REFUSALS

    @classmethod
    def refused(
        cls,
        decision: ControlDecision,
        code: RefusalCode,
        reason: str,
        *,
        job_id: str | None = None,
        seed: int | None = None,
    ) -> DecisionTaken:
        """The answer refusing `decision`: every refusal is built here, so none lacks a code.
        `job_id` is who answers (by default the job the decision names); `seed` the slot the
        refusal is about, if any. A long reason (an error message, say) is shortened."""
        return cls(
            decision_id=decision.decision_id,
            job_id=decision.job_id if job_id is None else job_id,
            action=decision.action,
            outcome="refused",
            code=code,
            reason=clip(reason) or "(no reason given)",
            layer=decision.layer,
            seed=seed,
        )


# v1 reasons as Esper's producers wrote them before refusals had a code, most specific first
# (an internal error's text may quote anything). Matched only here, when an old message is read.
_V1_WORDS: tuple[tuple[str, RefusalCode], ...] = (
    (r"^internal error:", "internal"),
    (r"^decision \S+ is for job .*, not for this job", "wrong_job"),
    (r"^unknown layer ", "unknown_layer"),
    (r" names no seed of layer |^seed \d+ is out of range", "invalid_seed"),
    (r"^no kernel for blueprint ", "kernel_unavailable"),
    (r"^loading kernel .* failed", "load_failed"),
    (r"^cannot ramp seed |^cannot set α:", "alpha_rejected"),
    (r"^cannot (germinate|keep|retire|set_alpha):", "seed_state"),
    (r"^the job has finished", "job_finished"),
    # Matched anywhere, as Tamiyo matched them while they were all it had.
    (r"no free seed slot", "no_free_slot"),
    (r"max_seeds reached", "max_seeds"),
    (r"morphogenesis is (disabled|off)", "morphogenesis_off"),
)
_V1_REASONS = tuple((re.compile(words, re.IGNORECASE), code) for words, code in _V1_WORDS)


def refusal_code_of_v1(reason: str) -> RefusalCode:
    """The code of a v1 refusal, from its words; `internal` when they are not Esper's own."""
    for pattern, code in _V1_REASONS:
        if pattern.search(reason):
            return code
    return "internal"


@register
class DecisionTakenV1(_DecisionAnswer):
    """`event.decision_taken` v1: a refusal says why in words only. Still read, from producers
    not yet upgraded and from old checkpoints; `upgrade()` gives the current DecisionTaken."""

    VERSION: ClassVar[int] = 1

    def upgrade(self) -> DecisionTaken:
        fields = self.model_dump()
        code = refusal_code_of_v1(self.reason) if self.outcome == "refused" else None
        return DecisionTaken(**fields, code=code)

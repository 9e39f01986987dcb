"""The wire contracts of Esper: every bus message and every shared API body, in one place.

Topics and the messages they carry:

    jobs        job.queued              JobQueued
    telemetry   telemetry.report        TelemetryReport (v3: LayerStats.next_layer, the layer a
                                        widening seed grows into; v2 TelemetryReportV2 and v1
                                        TelemetryReportV1 still read)
    control     control.decision        ControlDecision
                control.answer          ControlAnswer
    health      health.heartbeat        Heartbeat
    events      event.seed_transition   SeedTransition
                event.job_status        JobStatusChanged (v2: an ended job's final `metrics`;
                                        v1 JobStatusChangedV1 still read)
                event.kernel_ready      KernelReady (v2: a widening host's `downstream`; v1
                                        KernelReadyV1 still read)
                event.decision_taken    DecisionTaken (v2; v1 DecisionTakenV1 still read)
                event.decision_point_missed  DecisionPointMissed

Versioning. Each message type has its own integer VERSION, carried in the envelope. Payloads
forbid unknown fields, so *any* change of shape — even a new optional field — is a new VERSION:
a new class registered next to the old one, which stays registered for as long as some producer
may still send it. An old version that can be read as the current one says how in its
`upgrade()` (`Envelope.current()`; the bus's consumers hand handlers the upgraded message), so
what it lacks is derived once, here. `SCHEMA_VERSION` is the version of the envelope itself and
of these rules; it changes only if the envelope's fields do. `proto/` holds the JSON Schema of
each (type, version), generated from these models (`make proto`); a test fails when the two
drift apart.

Vocabulary. The field types and closed sets of names the messages are built from (`JobStatus`,
`TERMINAL_JOB_STATUSES`, `SeedStateName`, `Outcome`, `Identifier`, …) live in
`esper.contracts.vocabulary` and are exported here: a service that needs one imports it rather
than keeping a copy. `HostSignature` and `KernelMeta`, which travel in kernel messages and
Urza's API, are in `esper.contracts.kernels`.
"""

from pydantic import BaseModel

from esper.contracts.api import Check, ErrorBody, ErrorInfo, HealthStatus, Page, Readiness
from esper.contracts.control import ControlAnswer, ControlDecision, Strategy
from esper.contracts.envelope import (
    TOPICS,
    Envelope,
    Message,
    contract,
    contracts,
    register,
)
from esper.contracts.events import (
    REFUSAL_CODES,
    TRANSIENT_REFUSALS,
    DecisionPointMissed,
    DecisionTaken,
    DecisionTakenV1,
    JobStatusChanged,
    JobStatusChangedV1,
    KernelReady,
    KernelReadyV1,
    RefusalCode,
    SeedTransition,
)
from esper.contracts.examples import examples
from esper.contracts.health import Heartbeat
from esper.contracts.jobs import (
    JobAttempt,
    JobMetrics,
    JobProgress,
    JobQueued,
    JobSpec,
    JobSubmitted,
    JobView,
    SeedView,
)
from esper.contracts.kernels import HostSignature, KernelMeta
from esper.contracts.kernels_api import CompileRequest, KernelLineage, KernelResult, KernelUpload
from esper.contracts.runs import RunEnd, RunReply, RunReport
from esper.contracts.telemetry import (
    LayerStats,
    LayerStatsV2,
    SeedStats,
    TelemetryReport,
    TelemetryReportV1,
    TelemetryReportV2,
    finite_or_none,
)
from esper.contracts.vocabulary import (
    JOB_STATUSES,
    KERNEL_ID_RE,
    MAX_SAFE_INT,
    RUNNING_SEED_STATES,
    SEED_STATE_NAMES,
    TERMINAL_JOB_STATUSES,
    Action,
    Blend,
    BlueprintName,
    Count,
    Detail,
    Digest,
    HealthState,
    Identifier,
    JobStatus,
    KernelFormat,
    KernelId,
    KernelTag,
    Key,
    LayerName,
    NonNegative,
    Outcome,
    Reason,
    Scalar,
    SeedIndex,
    SeedStateName,
    ServiceName,
    Tag,
    Text,
    Timestamp,
    Unit,
    clip,
)

SCHEMA_VERSION = 1

MESSAGES: tuple[type[Message], ...] = (
    TelemetryReport,
    TelemetryReportV2,
    TelemetryReportV1,
    ControlDecision,
    ControlAnswer,
    Heartbeat,
    SeedTransition,
    JobStatusChanged,
    JobStatusChangedV1,
    KernelReady,
    KernelReadyV1,
    DecisionTaken,
    DecisionTakenV1,
    DecisionPointMissed,
    JobQueued,
)
"""Every contract Esper itself defines (the registry may also hold ones a test registered)."""

API_BODIES: tuple[type[BaseModel], ...] = (
    ErrorBody,
    HealthStatus,
    Readiness,
    Page,
    CompileRequest,
    KernelUpload,
    KernelLineage,
    KernelResult,
    JobSpec,
    JobView,
    JobSubmitted,
    RunReport,
    RunReply,
    RunEnd,
)

__all__ = [
    "API_BODIES",
    "JOB_STATUSES",
    "KERNEL_ID_RE",
    "MAX_SAFE_INT",
    "MESSAGES",
    "REFUSAL_CODES",
    "RUNNING_SEED_STATES",
    "SCHEMA_VERSION",
    "SEED_STATE_NAMES",
    "TERMINAL_JOB_STATUSES",
    "TOPICS",
    "TRANSIENT_REFUSALS",
    "Action",
    "Blend",
    "BlueprintName",
    "Check",
    "CompileRequest",
    "ControlAnswer",
    "ControlDecision",
    "Count",
    "DecisionPointMissed",
    "DecisionTaken",
    "DecisionTakenV1",
    "Detail",
    "Digest",
    "Envelope",
    "ErrorBody",
    "ErrorInfo",
    "HealthState",
    "HealthStatus",
    "Heartbeat",
    "HostSignature",
    "Identifier",
    "JobAttempt",
    "JobMetrics",
    "JobProgress",
    "JobQueued",
    "JobSpec",
    "JobStatus",
    "JobStatusChanged",
    "JobStatusChangedV1",
    "JobSubmitted",
    "JobView",
    "KernelFormat",
    "KernelId",
    "KernelLineage",
    "KernelMeta",
    "KernelReady",
    "KernelReadyV1",
    "KernelResult",
    "KernelTag",
    "KernelUpload",
    "Key",
    "LayerName",
    "LayerStats",
    "LayerStatsV2",
    "Message",
    "NonNegative",
    "Outcome",
    "Page",
    "Readiness",
    "Reason",
    "RefusalCode",
    "RunEnd",
    "RunReply",
    "RunReport",
    "Scalar",
    "SeedIndex",
    "SeedStateName",
    "SeedStats",
    "SeedTransition",
    "SeedView",
    "ServiceName",
    "Strategy",
    "Tag",
    "TelemetryReport",
    "TelemetryReportV1",
    "TelemetryReportV2",
    "Text",
    "Timestamp",
    "Unit",
    "clip",
    "contract",
    "contracts",
    "examples",
    "finite_or_none",
    "register",
]

"""The wire contracts of Esper: every bus message and every shared API body, in one place.

Topics and the messages they carry:

    telemetry   telemetry.report        TelemetryReport
    jobs        job.queued              JobQueued
    control     control.decision        ControlDecision
    health      health.heartbeat        Heartbeat
    events      event.seed_transition   SeedTransition
                event.job_status        JobStatusChanged
                event.kernel_ready      KernelReady
                event.decision_taken    DecisionTaken

Versioning. Each message type has its own integer VERSION, carried in the envelope. Payloads
forbid unknown fields, so *any* change of shape — even a new optional field — is a new VERSION:
a new class registered next to the old one, which stays registered for as long as some producer
may still send it. `SCHEMA_VERSION` is the version of the envelope itself and of these rules; it
changes only if the envelope's fields do. `proto/` holds the JSON Schema of each (type, version),
generated from these models (`make proto`); a test fails when the two drift apart.
"""

from pydantic import BaseModel

from esper.contracts._types import clip
from esper.contracts.api import Check, ErrorBody, ErrorInfo, HealthStatus, Page, Readiness
from esper.contracts.control import ControlDecision, Strategy
from esper.contracts.envelope import (
    TOPICS,
    Envelope,
    Message,
    contract,
    contracts,
    register,
)
from esper.contracts.events import DecisionTaken, JobStatusChanged, KernelReady, SeedTransition
from esper.contracts.examples import examples
from esper.contracts.health import Heartbeat
from esper.contracts.jobs import (
    JobMetrics,
    JobProgress,
    JobQueued,
    JobSpec,
    JobSubmitted,
    JobView,
    SeedView,
)
from esper.contracts.kernels_api import CompileRequest, KernelLineage, KernelResult, KernelUpload
from esper.contracts.telemetry import LayerStats, SeedStats, TelemetryReport, finite_or_none

SCHEMA_VERSION = 1

MESSAGES: tuple[type[Message], ...] = (
    TelemetryReport,
    ControlDecision,
    Heartbeat,
    SeedTransition,
    JobStatusChanged,
    KernelReady,
    DecisionTaken,
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
)

__all__ = [
    "API_BODIES",
    "MESSAGES",
    "SCHEMA_VERSION",
    "TOPICS",
    "Check",
    "CompileRequest",
    "ControlDecision",
    "DecisionTaken",
    "Envelope",
    "ErrorBody",
    "ErrorInfo",
    "HealthStatus",
    "Heartbeat",
    "JobMetrics",
    "JobProgress",
    "JobQueued",
    "JobSpec",
    "JobStatusChanged",
    "JobSubmitted",
    "JobView",
    "KernelLineage",
    "KernelReady",
    "KernelResult",
    "KernelUpload",
    "LayerStats",
    "Message",
    "Page",
    "Readiness",
    "SeedStats",
    "SeedTransition",
    "SeedView",
    "Strategy",
    "TelemetryReport",
    "clip",
    "contract",
    "contracts",
    "examples",
    "finite_or_none",
    "register",
]

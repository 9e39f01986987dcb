"""Job reports: what `GET /reports/jobs/{id}` returns, and where reports live on disk.

A report is the story of one job as Nissa saw it on the bus: its epoch curve, its decisions and
how they were answered, and each seed slot's lifecycle and contribution. Reports of tracked jobs
are built from memory; a finished job's report (and a running job's snapshot) is also written to
`<data_dir>/reports/<job_id>.json`, so it outlives the job's metric series and a restart of Nissa.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper.contracts import Identifier, JobMetrics, JobStatus, Outcome
from esper.files import atomic_write

log = logging.getLogger("nissa.reports")

ReportStatus = Literal[JobStatus, "UNKNOWN"]
"""A job's status; UNKNOWN until a `event.job_status` (or `job.queued`) about it was seen."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EpochPoint(_Model):
    epoch: int = Field(ge=0, description="index of the epoch that ended (0-based)")
    step: int = Field(ge=0, description="training steps done when it ended")
    ts: float
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float | None = None


class StepPoint(_Model):
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    ts: float
    train_loss: float | None = None


class TransitionRecord(_Model):
    ts: float
    step: int | None = None
    from_state: str
    to_state: str
    reason: str
    kernel_id: str | None = None


class ContributionPoint(_Model):
    epoch: int
    step: int
    value: float


class SeedReport(_Model):
    layer: str
    seed: int
    state: str
    alpha: float | None = None
    kernel_id: str | None = None
    blueprint: str | None = None
    params: int | None = Field(default=None, description="the kernel's parameters, when known")
    blend: str | None = None
    contribution: float | None = Field(
        default=None, description="latest measured: validation accuracy with − without the seed"
    )
    error_count: int = 0
    first_seen: float
    transitions: list[TransitionRecord] = Field(default_factory=list)
    contributions: list[ContributionPoint] = Field(default_factory=list)
    transitions_dropped: int = 0


class DecisionReport(_Model):
    decision_id: str
    action: str
    layer: str
    seed: int | None = None
    blueprint: str | None = None
    kernel: str | None = None
    reason: str | None = None
    decided_at: float | None = Field(default=None, description="when it was published")
    outcome: Outcome | None = None
    outcome_reason: str | None = None
    taken_at: float | None = Field(default=None, description="when the job answered")
    latency_s: float | None = None


class MissedPoint(_Model):
    """A decision point the job went past without the controller's answer
    (`event.decision_point_missed`): it applied no decision there."""

    kind: Literal["epoch", "step"]
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    reason: str = Field(description="timeout, or no_controller (none was alive to ask)")
    waited_s: float = Field(ge=0)
    ts: float = Field(description="when the job said so")


class DecisionPointsReport(_Model):
    """How the job's decision points went: answered by the controller, or missed."""

    answered: int = Field(default=0, ge=0, description="control.answer messages to the job")
    missed: dict[str, int] = Field(default_factory=dict, description="missed points by reason")
    missed_points: list[MissedPoint] = Field(
        default_factory=list, description="the latest missed points, oldest first (bounded)"
    )


class JobReport(_Model):
    job_id: Identifier
    status: ReportStatus
    error: str | None = None
    attempt: int | None = None
    first_seen: float
    last_seen: float
    finished_at: float | None = None
    epochs_completed: int = 0
    step: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float | None = None
    parameters_added: int | None = Field(
        default=None, description="parameters of the kernels in ACTIVE/RETIRING seeds"
    )
    # Optional: a report written before jobs said their final metrics still loads.
    final: JobMetrics | None = Field(
        default=None,
        description="the job's final metrics as its ending `event.job_status` (v2) said them: "
        "the last epoch's (`test_*` with the last weights) and the best validation epoch's "
        "(`best_*`); null until then, or when the job measured nothing",
    )
    epochs: list[EpochPoint] = Field(default_factory=list)
    steps: list[StepPoint] = Field(default_factory=list)
    decisions: list[DecisionReport] = Field(default_factory=list)
    decision_points: DecisionPointsReport = Field(default_factory=DecisionPointsReport)
    seeds: list[SeedReport] = Field(default_factory=list)
    dropped: dict[str, int] = Field(
        default_factory=dict, description="entries left out to stay bounded, by kind"
    )
    source: Literal["live", "stored"] = "live"


class JobSummary(_Model):
    job_id: str
    status: ReportStatus
    epochs_completed: int
    last_seen: float
    finished_at: float | None = None
    source: Literal["live", "stored"]


class ReportStore:
    """`<root>/<job_id>.json`, written atomically; pruned by age and count.

    Blocking file I/O: callers on the event loop run these methods in a thread.
    """

    def __init__(self, root: Path, *, retention_s: float, max_reports: int) -> None:
        self.root = root
        self.retention_s = retention_s
        self.max_reports = max_reports
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def write(self, report: JobReport) -> None:
        atomic_write(self.path(report.job_id), report.model_dump_json().encode())

    def read(self, job_id: str) -> JobReport | None:
        try:
            text = self.path(job_id).read_text()
        except (FileNotFoundError, OSError):
            return None
        try:
            report = JobReport.model_validate_json(text)
        except ValidationError as err:
            log.warning("report file of %s is unreadable: %s", job_id, err.errors()[:1])
            return None
        return report.model_copy(update={"source": "stored"})

    def load_all(self) -> list[JobReport]:
        """Every stored report still within retention, oldest first (for a restart)."""
        for stale in self.root.glob("*.tmp*"):  # a write that a crash interrupted
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.prune()
        reports = []
        for path in sorted(self.root.glob("*.json"), key=_mtime):
            report = self.read(path.stem)
            if report is not None:
                reports.append(report)
        return reports

    def summaries(self, limit: int) -> list[JobSummary]:
        out = []
        for path in sorted(self.root.glob("*.json"), key=_mtime, reverse=True)[:limit]:
            report = self.read(path.stem)
            if report is not None:
                out.append(summary(report))
        return out

    def prune(self) -> int:
        """Remove reports past `retention_s` (by last write), then the oldest beyond the count."""
        files = sorted(self.root.glob("*.json"), key=_mtime)
        cutoff = time.time() - self.retention_s
        doomed = [p for p in files if _mtime(p) < cutoff]
        keep = [p for p in files if _mtime(p) >= cutoff]
        doomed += keep[: max(0, len(keep) - self.max_reports)]
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return len(doomed)


def summary(report: JobReport) -> JobSummary:
    return JobSummary(
        job_id=report.job_id,
        status=report.status,
        epochs_completed=report.epochs_completed,
        last_seen=report.last_seen,
        finished_at=report.finished_at,
        source=report.source,
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0

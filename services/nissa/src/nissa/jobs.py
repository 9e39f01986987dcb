"""What Nissa remembers about one job: curves, decisions, seed slots — every list bounded.

Messages arrive at least once and not always in order (telemetry is batched, events are not;
different streams are read side by side), so every update is idempotent and ordered by the time
the message says it happened: a late message never overwrites a newer state.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from esper.contracts import RUNNING_SEED_STATES, TERMINAL_JOB_STATUSES, JobMetrics, Outcome
from nissa.reports import (
    ContributionPoint,
    DecisionPointsReport,
    DecisionReport,
    EpochPoint,
    JobReport,
    JobSummary,
    MissedPoint,
    ReportStatus,
    SeedReport,
    StepPoint,
    TransitionRecord,
)

Kernels = dict[str, tuple[str | None, int]]
"""kernel id → (blueprint, parameters), from `kernel.ready` events and Urza."""


def thin(items: list[Any], cap: int) -> int:
    """Keep a list within `cap` by dropping every other entry of its older half: a long curve
    keeps its shape (and its newest points at full resolution). Returns how many were dropped."""
    if len(items) <= cap:
        return 0
    half = len(items) // 2
    older = items[:half]
    kept = older[::2]
    items[:half] = kept
    return len(older) - len(kept)


@dataclass
class Seed:
    layer: str
    seed: int
    first_seen: float
    state: str = "DORMANT"
    state_ts: float = 0.0
    alpha: float | None = None
    kernel_id: str | None = None
    blend: str | None = None
    contribution: float | None = None
    error_count: int = 0
    transitions: list[TransitionRecord] = field(default_factory=list)
    contributions: list[ContributionPoint] = field(default_factory=list)
    transitions_dropped: int = 0

    def set_state(self, state: str, ts: float) -> None:
        if ts >= self.state_ts:
            self.state = state
            self.state_ts = ts


@dataclass
class Decision:
    decision_id: str
    action: str
    layer: str
    seed: int | None = None
    blueprint: str | None = None
    kernel: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    outcome: Outcome | None = None
    outcome_reason: str | None = None
    taken_at: float | None = None
    latency_observed: bool = False

    @property
    def latency_s(self) -> float | None:
        if self.decided_at is None or self.taken_at is None:
            return None
        return max(0.0, self.taken_at - self.decided_at)


@dataclass
class Job:
    job_id: str
    first_seen: float
    last_seen: float
    status: ReportStatus = "UNKNOWN"
    status_ts: float = 0.0
    error: str | None = None
    attempt: int | None = None
    finished_at: float | None = None
    final: JobMetrics | None = None
    """What the job's ending status said it measured, last and best."""
    counted_endings: set[str] = field(default_factory=set)
    epochs: list[EpochPoint] = field(default_factory=list)
    steps: list[StepPoint] = field(default_factory=list)
    epochs_completed: int = 0
    step: int = 0
    newest_epoch: int = -1
    newest_step: int = -1
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float | None = None
    step_loss: float | None = None
    last_report_ts: float | None = None
    pair: tuple[int, int, float] | None = None
    """(epoch, step, ts) of the latest step report: the start of the next step-time interval."""
    seeds: dict[tuple[str, int], Seed] = field(default_factory=dict)
    decisions: OrderedDict[str, Decision] = field(default_factory=OrderedDict)
    points_answered: int = 0
    points_missed: dict[str, int] = field(default_factory=dict)
    """Missed decision points by reason: every one, including those `missed` left out."""
    missed: list[MissedPoint] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    dirty: bool = True
    """Changed since its report was last written."""
    version: int = 0
    """Changed since its metric lines were last rendered (compared, not counted)."""

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

    def drop(self, kind: str, n: int = 1) -> None:
        if n:
            self.dropped[kind] = self.dropped.get(kind, 0) + n

    def add_epoch(self, point: EpochPoint, cap: int) -> None:
        """Insert by epoch index; a second report of one epoch (a resumed job) replaces it."""
        epochs = [p.epoch for p in self.epochs]
        at = bisect.bisect_left(epochs, point.epoch)
        if at < len(self.epochs) and self.epochs[at].epoch == point.epoch:
            self.epochs[at] = point
        else:
            self.epochs.insert(at, point)
            self.drop("epochs", thin(self.epochs, cap))

    def add_step(self, point: StepPoint, cap: int) -> None:
        """Append (the common case), or insert a report delivered late in its place; a step
        already on the curve is not added twice."""
        if not self.steps or point.step > self.steps[-1].step:
            self.steps.append(point)
        else:
            at = bisect.bisect_left([p.step for p in self.steps], point.step)
            if self.steps[at].step == point.step:
                return
            self.steps.insert(at, point)
        self.drop("steps", thin(self.steps, cap))

    def add_missed(self, point: MissedPoint, cap: int) -> None:
        """Count a missed decision point and keep it (the newest `cap` of them)."""
        self.points_missed[point.reason] = self.points_missed.get(point.reason, 0) + 1
        self.missed.append(point)
        if len(self.missed) > cap:
            self.drop("missed_points", len(self.missed) - cap)
            del self.missed[: len(self.missed) - cap]

    def summary(self) -> JobSummary:
        return JobSummary(
            job_id=self.job_id,
            status=self.status,
            epochs_completed=self.epochs_completed,
            last_seen=self.last_seen,
            finished_at=self.finished_at,
            source="live",
        )

    def to_report(self, kernels: Kernels | None = None) -> JobReport:
        kernels = kernels or {}
        return JobReport(
            job_id=self.job_id,
            status=self.status,
            error=self.error,
            attempt=self.attempt,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            finished_at=self.finished_at,
            epochs_completed=self.epochs_completed,
            step=self.step,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            val_accuracy=self.val_accuracy,
            samples_per_s=self.samples_per_s,
            parameters_added=parameters_added(self, kernels),
            final=self.final,
            epochs=list(self.epochs),
            steps=list(self.steps),
            decisions=[_decision_report(d) for d in self.decisions.values()],
            decision_points=DecisionPointsReport(
                answered=self.points_answered,
                missed=dict(self.points_missed),
                missed_points=list(self.missed),
            ),
            seeds=[_seed_report(s, kernels) for s in sorted(self.seeds.values(), key=_slot)],
            dropped=dict(self.dropped),
        )

    @classmethod
    def from_report(cls, report: JobReport) -> Job:
        """A job restored from its stored report (Nissa restarted while it was tracked)."""
        job = cls(
            job_id=report.job_id,
            first_seen=report.first_seen,
            last_seen=report.last_seen,
            status=report.status,
            status_ts=report.finished_at or report.last_seen,
            error=report.error,
            attempt=report.attempt,
            finished_at=report.finished_at,
            final=report.final,
            epochs=list(report.epochs),
            steps=list(report.steps),
            epochs_completed=report.epochs_completed,
            step=report.step,
            newest_epoch=report.epochs[-1].epoch if report.epochs else -1,
            newest_step=report.step,
            train_loss=report.train_loss,
            val_loss=report.val_loss,
            val_accuracy=report.val_accuracy,
            samples_per_s=report.samples_per_s,
            points_answered=report.decision_points.answered,
            points_missed=dict(report.decision_points.missed),
            missed=list(report.decision_points.missed_points),
            dropped=dict(report.dropped),
            dirty=False,
        )
        job.counted_endings = {report.status} if report.status in TERMINAL_JOB_STATUSES else set()
        for s in report.seeds:
            job.seeds[(s.layer, s.seed)] = Seed(
                layer=s.layer,
                seed=s.seed,
                first_seen=s.first_seen,
                state=s.state,
                state_ts=s.transitions[-1].ts if s.transitions else s.first_seen,
                alpha=s.alpha,
                kernel_id=s.kernel_id,
                blend=s.blend,
                contribution=s.contribution,
                error_count=s.error_count,
                transitions=list(s.transitions),
                contributions=list(s.contributions),
                transitions_dropped=s.transitions_dropped,
            )
        for d in report.decisions:
            job.decisions[d.decision_id] = Decision(
                decision_id=d.decision_id,
                action=d.action,
                layer=d.layer,
                seed=d.seed,
                blueprint=d.blueprint,
                kernel=d.kernel,
                reason=d.reason,
                decided_at=d.decided_at,
                outcome=d.outcome,
                outcome_reason=d.outcome_reason,
                taken_at=d.taken_at,
                latency_observed=d.latency_s is not None,
            )
        return job


def parameters_added(job: Job, kernels: Kernels) -> int | None:
    """Parameters of the kernels in the job's ACTIVE and RETIRING seeds; None while the size of
    one of them is not known (a missing number must not read as a small one)."""
    total = 0
    for seed in job.seeds.values():
        if seed.state not in RUNNING_SEED_STATES:
            continue
        known = kernels.get(seed.kernel_id) if seed.kernel_id else None
        if known is None:
            return None
        total += known[1]
    return total


def _slot(seed: Seed) -> tuple[str, int]:
    return (seed.layer, seed.seed)


def _seed_report(seed: Seed, kernels: Kernels) -> SeedReport:
    known = kernels.get(seed.kernel_id) if seed.kernel_id else None
    return SeedReport(
        layer=seed.layer,
        seed=seed.seed,
        state=seed.state,
        alpha=seed.alpha,
        kernel_id=seed.kernel_id,
        blueprint=known[0] if known else None,
        params=known[1] if known else None,
        blend=seed.blend,
        contribution=seed.contribution,
        error_count=seed.error_count,
        first_seen=seed.first_seen,
        transitions=list(seed.transitions),
        contributions=list(seed.contributions),
        transitions_dropped=seed.transitions_dropped,
    )


def _decision_report(d: Decision) -> DecisionReport:
    return DecisionReport(
        decision_id=d.decision_id,
        action=d.action,
        layer=d.layer,
        seed=d.seed,
        blueprint=d.blueprint,
        kernel=d.kernel,
        reason=d.reason,
        decided_at=d.decided_at,
        outcome=d.outcome,
        outcome_reason=d.outcome_reason,
        taken_at=d.taken_at,
        latency_s=d.latency_s,
    )

"""Nissa's in-memory aggregates: what the bus said, folded into bounded state.

- jobs (`jobs.Job`): at most `max_jobs`; a finished job is dropped `retention_s` after it
  finished, a job nothing was heard from for `idle_retention_s` too;
- counters and histograms with bounded labels (`labels.py`);
- service health from heartbeats (`services.ServiceHealth`);
- the bus's consumer groups (set by `buswatch.BusWatch`).

Times: every message is placed at its envelope's `ts` capped at the moment it was handled, so a
message replayed from a stream (Nissa's first start reads what the streams still hold) is as old
as it says, and a clock running ahead cannot make a job look fresh forever.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    DecisionTaken,
    Heartbeat,
    JobQueued,
    JobStatusChanged,
    KernelReady,
    SeedTransition,
    TelemetryReport,
)
from nissa.histogram import WeightedHistogram
from nissa.jobs import Decision, Job, Seed, thin
from nissa.labels import Budget
from nissa.reports import (
    ContributionPoint,
    EpochPoint,
    JobReport,
    MissedPoint,
    StepPoint,
    TransitionRecord,
)
from nissa.services import ServiceHealth
from nissa.settings import NissaSettings

log = logging.getLogger("nissa.state")

JOB_SERVICE = "tolaria-job"
"""Job processes beat as this service (instance = job id), carrying kernel cache counters; they
are jobs, not services: they never count in `esper_service_up`."""

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CACHE_KINDS = ("hits", "misses")
ANSWERS = ("decisions", "nothing")
"""The `answer` label of a control.answer: it carried decisions, or said there were none."""


@dataclass
class CacheCounts:
    """The last cumulative cache counters of one job process."""

    started_at: float
    ts: float
    counts: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class GroupStat:
    lag: int | None
    pending: int


@dataclass
class BusSnapshot:
    """The latest read of the streams (by `buswatch`); `ok` False when the read failed, and then
    the figures below are empty: an unread lag must be missing, not stale."""

    ok: bool = False
    ts: float = 0.0
    streams: dict[str, int] = field(default_factory=dict)
    groups: dict[tuple[str, str], GroupStat] = field(default_factory=dict)
    dead_letter_length: int | None = None


class NissaState:
    def __init__(self, settings: NissaSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.started_at = clock()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        """Least recently heard first."""
        self.finished: OrderedDict[str, float] = OrderedDict()
        """Finished jobs, earliest finish first: what the job bound drops first."""
        self.counters: dict[str, dict[tuple[str, ...], float]] = {}
        self.step_time = WeightedHistogram(STEP_BUCKETS)
        self.decision_latency = WeightedHistogram(LATENCY_BUCKETS)
        self.services = ServiceHealth(
            down_after_beats=settings.service_down_after_beats,
            max_services=settings.max_services,
            max_instances=settings.max_instances_per_service,
            instance_retention_s=settings.instance_retention_s,
        )
        self.caches: OrderedDict[str, CacheCounts] = OrderedDict()
        self.kernels: OrderedDict[str, tuple[str | None, int]] = OrderedDict()
        self.wanted_kernels: OrderedDict[str, None] = OrderedDict()
        """Kernel ids seen in seeds whose size is unknown: looked up in Urza (`kernels.py`)."""
        self.bus = BusSnapshot()
        self.tiers = Budget(16)
        self.groups = Budget(64)
        self.tick = 0
        """Stamps `Job.version` on every change, so the exposition knows what to re-render."""
        self.kernels_version = 0
        self.unsaved: dict[str, JobReport] = {}
        """Reports of jobs dropped from memory before their latest state was written."""

    # ----------------------------------------------------------------- basics
    def now(self) -> float:
        return self.clock()

    def at(self, ts: float) -> float:
        return min(ts, self.clock())

    def count(self, name: str, labels: tuple[str, ...] = (), by: float = 1.0) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + by

    def job(self, job_id: str, ts: float) -> Job:
        """The tracked job `job_id`, created (making room if need be) when new."""
        job = self.jobs.get(job_id)
        if job is None:
            while len(self.jobs) >= self.settings.max_jobs:
                self._evict_one()
            job = self.jobs[job_id] = Job(job_id=job_id, first_seen=ts, last_seen=ts)
        else:
            self.jobs.move_to_end(job_id)
            job.last_seen = max(job.last_seen, ts)
        job.dirty = True
        self.tick += 1
        job.version = self.tick
        return job

    def _evict_one(self) -> None:
        victim = next(iter(self.finished)) if self.finished else next(iter(self.jobs))
        self.drop_job(victim, "capacity")

    def drop_job(self, job_id: str, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        self.finished.pop(job_id, None)
        self.caches.pop(job_id, None)
        if job is None:
            return
        self.count("esper_nissa_jobs_dropped", (reason,))
        if job.dirty and job.status != "UNKNOWN":
            # Written by the snapshot loop; a job only ever heard of through garbage (status
            # UNKNOWN) is not worth a file.
            self.unsaved[job_id] = job.to_report(self.kernels)
            if len(self.unsaved) > self.settings.max_jobs:  # a flood between two snapshots
                self.unsaved.pop(next(iter(self.unsaved)))
                self.count("esper_nissa_refused", ("report",))

    def housekeeping(self) -> None:
        """Drop jobs past their retention, forget silent instances and stale job caches."""
        now = self.clock()
        s = self.settings
        # A scan, not the oldest few: a late status can finish a job "earlier" than one before it.
        expired = [j for j, at in self.finished.items() if now - at > s.retention_s]
        for job_id in expired:
            self.drop_job(job_id, "retention")
        idle = [j.job_id for j in self.jobs.values() if now - j.last_seen > s.idle_retention_s]
        for job_id in idle:
            self.drop_job(job_id, "idle")
        self.services.prune(now)
        for instance in [k for k, c in self.caches.items() if now - c.ts > s.idle_retention_s]:
            del self.caches[instance]

    def restore(self, report: JobReport) -> bool:
        """Track a job again from its stored report, if it is still within retention."""
        now = self.clock()
        s = self.settings
        if report.finished_at is not None and now - report.finished_at > s.retention_s:
            return False
        if now - report.last_seen > s.idle_retention_s or report.job_id in self.jobs:
            return False
        while len(self.jobs) >= s.max_jobs:
            self._evict_one()
        job = Job.from_report(report)
        self.tick += 1
        job.version = self.tick
        self.jobs[job.job_id] = job
        if job.finished and job.finished_at is not None:
            self.finished[job.job_id] = job.finished_at
        return True

    # ----------------------------------------------------------------- telemetry
    def on_telemetry(self, report: TelemetryReport, sent: float) -> None:
        ts = self.at(sent)
        s = self.settings
        job = self.job(report.job_id, ts)
        job.last_report_ts = max(job.last_report_ts or 0.0, ts)
        if report.step > job.step:
            # Steps are counted from progress (the highest step reported), so a duplicate or a
            # late report adds nothing, and a resumed job re-training from its checkpoint does
            # not count the same steps twice.
            self.count("esper_training_steps", (), report.step - job.step)
            job.step = report.step
        if report.kind == "step":
            self._step_time(job, report, sent)
            if report.step > job.newest_step:
                job.newest_step = report.step
                job.step_loss = report.train_loss
            point = StepPoint(
                step=report.step, epoch=report.epoch, ts=ts, train_loss=report.train_loss
            )
            job.add_step(point, s.max_step_points)
        else:
            job.pair = None  # the next interval starts after evaluation and checkpointing
            point_e = EpochPoint(
                epoch=report.epoch,
                step=report.step,
                ts=ts,
                train_loss=report.train_loss,
                val_loss=report.val_loss,
                val_accuracy=report.val_accuracy,
                samples_per_s=report.samples_per_s,
            )
            job.add_epoch(point_e, s.max_epoch_points)
            if report.epoch >= job.newest_epoch:
                job.newest_epoch = report.epoch
                job.epochs_completed = max(job.epochs_completed, report.epoch + 1)
                # None stays None: a metric that was not measured (or was NaN) reads as missing.
                job.train_loss = report.train_loss
                job.val_loss = report.val_loss
                job.val_accuracy = report.val_accuracy
                job.samples_per_s = report.samples_per_s
        self._seeds_from_report(job, report, ts)
        for taken in report.answers:
            # The report is sent at the decision point after the job executed these, so its
            # time is not theirs: the outcome is folded (once per decision), the time is not.
            self._outcome(taken, ts)

    def _step_time(self, job: Job, report: TelemetryReport, sent: float) -> None:
        """Mean step time between two step reports of one epoch: Δts / Δsteps, weighted by Δsteps.
        Pairs that straddle an epoch end are skipped: their interval includes evaluation."""
        pair = job.pair
        if pair is not None:
            epoch, step, ts = pair
            if report.epoch == epoch and report.step > step and sent > ts:
                steps = report.step - step
                self.step_time.observe((sent - ts) / steps, steps)
        if pair is None or report.step > pair[1]:
            job.pair = (report.epoch, report.step, sent)

    def _seeds_from_report(self, job: Job, report: TelemetryReport, ts: float) -> None:
        reported: set[tuple[str, int]] = set()
        for stats in report.seeds:
            key = (stats.layer, stats.seed)
            seed = self._seed(job, stats.layer, stats.seed, ts)
            if seed is None:
                continue
            reported.add(key)
            if ts < seed.state_ts:
                continue  # a transition newer than this report already says more
            seed.set_state(stats.state, ts)
            seed.alpha = stats.alpha
            seed.kernel_id = stats.kernel_id or seed.kernel_id
            seed.blend = stats.blend
            seed.error_count = stats.error_count
            if stats.contribution is not None:
                seed.contribution = stats.contribution
                if report.kind == "epoch":
                    point = ContributionPoint(
                        epoch=report.epoch, step=report.step, value=stats.contribution
                    )
                    points = seed.contributions
                    if points and points[-1].epoch >= point.epoch:
                        # a repeated or late epoch: keep the curve ordered, one point an epoch
                        points[:] = [p for p in points if p.epoch != point.epoch] + [point]
                        points.sort(key=lambda p: p.epoch)
                    else:
                        points.append(point)
                    thin(points, self.settings.max_epoch_points)
            self._want_kernel(seed.kernel_id)
        # A report lists every seed that is not DORMANT: a known slot missing from it is DORMANT.
        for key, seed in job.seeds.items():
            if key not in reported and seed.state != "DORMANT" and ts >= seed.state_ts:
                seed.set_state("DORMANT", ts)
                seed.alpha = 0.0

    def _seed(self, job: Job, layer: str, index: int, ts: float) -> Seed | None:
        seed = job.seeds.get((layer, index))
        if seed is None:
            if len(job.seeds) >= self.settings.max_seeds_per_job:
                job.drop("seeds")
                return None
            seed = job.seeds[(layer, index)] = Seed(layer=layer, seed=index, first_seen=ts)
        return seed

    def _want_kernel(self, kernel_id: str | None) -> None:
        if kernel_id and kernel_id not in self.kernels and kernel_id not in self.wanted_kernels:
            self.wanted_kernels[kernel_id] = None
            while len(self.wanted_kernels) > 1000:
                self.wanted_kernels.popitem(last=False)

    # ----------------------------------------------------------------- events
    def on_transition(self, event: SeedTransition, sent: float) -> None:
        ts = self.at(event.occurred_at if event.occurred_at is not None else sent)
        self.count("esper_seed_transitions", (event.from_state, event.to_state))
        job = self.job(event.job_id, self.at(sent))
        seed = self._seed(job, event.layer, event.seed, ts)
        if seed is None:
            return
        record = TransitionRecord(
            ts=ts,
            step=event.step,
            from_state=event.from_state,
            to_state=event.to_state,
            reason=event.reason[:300],
            kernel_id=event.kernel_id,
        )
        if any(
            (t.ts, t.from_state, t.to_state) == (ts, event.from_state, event.to_state)
            for t in seed.transitions
        ):
            return  # the same transition published twice (two envelopes, one event)
        seed.transitions.append(record)
        seed.transitions.sort(key=lambda t: t.ts)  # events of one slot may arrive out of order
        cap = self.settings.max_transitions_per_seed
        if len(seed.transitions) > cap:
            seed.transitions_dropped += len(seed.transitions) - cap
            del seed.transitions[: len(seed.transitions) - cap]
        seed.set_state(event.to_state, ts)
        if event.kernel_id:
            seed.kernel_id = event.kernel_id
            self._want_kernel(event.kernel_id)
        if event.to_state == "DORMANT":
            seed.alpha = 0.0

    def on_decision(self, decision: ControlDecision, sent: float) -> None:
        ts = self.at(sent)
        job = self.job(decision.job_id, ts)
        record = self._decision(job, decision.decision_id, decision.action, decision.layer)
        if record.decided_at is not None:
            return  # a copy
        record.decided_at = ts
        record.seed = record.seed if record.seed is not None else decision.seed
        record.blueprint = decision.blueprint
        record.kernel = decision.kernel
        record.reason = decision.reason[:300]
        self.count("esper_decisions", (decision.action,))
        self._latency(record)

    def on_decision_taken(self, taken: DecisionTaken, sent: float) -> None:
        ts = self.at(sent)
        record = self._outcome(taken, ts)
        if record.taken_at is None:
            record.taken_at = ts
            self._latency(record)

    def _outcome(self, taken: DecisionTaken, ts: float) -> Decision:
        """Fold a decision's answer, from its event or from a report's `answers`: counted once
        per decision, whichever copy comes first."""
        job = self.job(taken.job_id, ts)
        record = self._decision(job, taken.decision_id, taken.action, taken.layer)
        if record.outcome is not None:
            return record
        record.outcome = taken.outcome
        record.outcome_reason = taken.reason[:300]
        if taken.seed is not None:
            record.seed = taken.seed
        # The code is a closed set (esper.contracts.REFUSAL_CODES): a bounded label as it is.
        self.count("esper_decision_outcomes", (taken.action, taken.outcome, taken.code or ""))
        return record

    def on_answer(self, answer: ControlAnswer, sent: float) -> None:
        """The controller's answer to a decision point. A controller's decisions travel in its
        answer, not as `control.decision` messages of their own, so each is folded as one (by
        decision id: a decision also published on its own is counted once)."""
        ts = self.at(sent)
        self.count(
            "esper_decision_points_answered", (ANSWERS[0] if answer.decisions else ANSWERS[1],)
        )
        job = self.job(answer.job_id, ts)
        job.points_answered += 1
        for decision in answer.decisions:
            self.on_decision(decision, sent)

    def on_point_missed(self, event: DecisionPointMissed, sent: float) -> None:
        ts = self.at(sent)
        self.count("esper_decision_points_missed", (event.reason,))
        job = self.job(event.job_id, ts)
        point = MissedPoint(
            kind=event.kind,
            epoch=event.epoch,
            step=event.step,
            reason=event.reason,
            waited_s=event.waited_s,
            ts=ts,
        )
        job.add_missed(point, self.settings.max_decisions_per_job)

    def _decision(self, job: Job, decision_id: str, action: str, layer: str) -> Decision:
        record = job.decisions.get(decision_id)
        if record is None:
            record = job.decisions[decision_id] = Decision(decision_id, action, layer)
            while len(job.decisions) > self.settings.max_decisions_per_job:
                job.decisions.popitem(last=False)
                job.drop("decisions")
        return record

    def _latency(self, record: Decision) -> None:
        latency = record.latency_s
        if latency is not None and not record.latency_observed:
            record.latency_observed = True
            self.decision_latency.observe(latency, 1, (record.action,))

    def on_job_status(self, event: JobStatusChanged, sent: float) -> None:
        ts = self.at(sent)
        job = self.job(event.job_id, ts)
        if event.status in TERMINAL_JOB_STATUSES and event.status not in job.counted_endings:
            job.counted_endings.add(event.status)
            self.count("esper_jobs_finished", (event.status,))
        if ts < job.status_ts:
            return  # an older status delivered late
        job.status = event.status
        job.status_ts = ts
        job.attempt = event.attempt
        job.error = event.error
        # A v1 event (upgraded) has no metrics: the report then shows none rather than stale ones.
        job.final = event.metrics
        if event.status in TERMINAL_JOB_STATUSES:
            job.finished_at = ts
            self.finished[job.job_id] = ts
            self.finished.move_to_end(job.job_id)
        else:
            job.finished_at = None
            self.finished.pop(job.job_id, None)

    def on_job_queued(self, queued: JobQueued, sent: float) -> None:
        ts = self.at(sent)
        job = self.job(queued.job_id, ts)
        self.count("esper_jobs_queued")
        if job.status == "UNKNOWN":
            job.status = "PENDING"
            job.status_ts = ts

    def on_kernel_ready(self, kernel: KernelReady) -> None:
        self.count("esper_kernels_ready", (kernel.format,))
        self.remember_kernel(kernel.kernel_id, kernel.blueprint, kernel.params)

    def remember_kernel(self, kernel_id: str, blueprint: str | None, params: int) -> None:
        if self.kernels.get(kernel_id) != (blueprint, params):
            self.kernels_version += 1  # "parameters added" of some job may change
        self.kernels[kernel_id] = (blueprint, params)
        self.kernels.move_to_end(kernel_id)
        self.wanted_kernels.pop(kernel_id, None)
        while len(self.kernels) > self.settings.max_kernels:
            self.kernels.popitem(last=False)

    # ----------------------------------------------------------------- health
    def on_heartbeat(self, beat: Heartbeat, sent: float) -> None:
        ts = self.at(sent)
        if beat.service == JOB_SERVICE:
            self._job_beat(beat, ts)
            return
        if not self.services.beat(beat, ts):
            self.count("esper_nissa_refused", ("service",))

    def _job_beat(self, beat: Heartbeat, ts: float) -> None:
        job_id = beat.instance
        job = self.jobs.get(job_id)
        if job is not None:
            self.jobs.move_to_end(job_id)
            job.last_seen = max(job.last_seen, ts)
        known = self.caches.get(job_id)
        if known is not None and beat.started_at == known.started_at and ts < known.ts:
            return  # an older beat delivered late
        counts: dict[tuple[str, str], int] = {}
        for key, value in beat.details.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "cache" or parts[2] not in CACHE_KINDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                continue
            counts[(self.tiers(parts[1]), parts[2])] = value
        if known is None or beat.started_at != known.started_at:
            # A process we have not seen before. One that started after Nissa did: all of its
            # counts are new. One that was already running when Nissa started (Nissa restarted,
            # or replays old beats): its counts so far were counted before, or are history;
            # they are the baseline.
            base = {} if beat.started_at >= self.started_at else counts
        else:
            base = known.counts
        for (tier, kind), value in counts.items():
            before = base.get((tier, kind), 0)
            delta = value - before if value >= before else value  # fewer: the counter restarted
            self.count(f"esper_kernel_cache_{kind}", (tier,), delta)  # 0 still makes the series
        self.caches[job_id] = CacheCounts(started_at=beat.started_at, ts=ts, counts=counts)
        self.caches.move_to_end(job_id)
        while len(self.caches) > self.settings.max_jobs:
            self.caches.popitem(last=False)

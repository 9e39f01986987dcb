"""Nissa's Prometheus metrics, rendered as exposition text from `NissaState` at scrape time.

Why text rendered here rather than prometheus_client Gauges or a Collector: most series belong
to jobs (~30 each), and most jobs are finished and no longer change. prometheus_client formats
every sample on every scrape (≈ 7 µs a sample: 20+ ms for 110 jobs on a small machine, and a p99
far past 50 ms while messages keep arriving). Here each job's lines are rendered once per change
of the job and reused, so a scrape costs the few jobs that moved plus the small global families.
A dropped job's lines are gone at the next scrape: no `remove()` bookkeeping, and no series can
outlive the state it describes.

Every family is declared (HELP and TYPE) on every scrape, even with no sample yet, so dashboards
and alerts find their names. The README's table lists every metric, its labels and its source.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import get_args

from esper.contracts import (
    JOB_STATUSES,
    SEED_STATE_NAMES,
    TERMINAL_JOB_STATUSES,
    DecisionPointMissed,
)
from nissa.histogram import WeightedHistogram
from nissa.jobs import Job, parameters_added
from nissa.state import ANSWERS, NissaState

REPORT_STATUSES = (*JOB_STATUSES, "UNKNOWN")
ENDINGS = tuple(s for s in JOB_STATUSES if s in TERMINAL_JOB_STATUSES)  # ordered: exposition
COUNTED_SEED_STATES = SEED_STATE_NAMES[1:]  # a job's DORMANT slots are not all known: not counted
MISSED_REASONS: tuple[str, ...] = get_args(DecisionPointMissed.model_fields["reason"].annotation)

#: Per-job families, in exposition order: name → (type, help).
JOB_FAMILIES: dict[str, tuple[str, str]] = {
    "esper_job_status": ("gauge", "1 for the job's current status"),
    "esper_job_epoch": ("gauge", "Epochs the job has completed"),
    "esper_job_step": ("gauge", "Training steps the job has done"),
    "esper_job_train_loss": ("gauge", "Mean training loss of the job's last epoch"),
    "esper_job_val_loss": ("gauge", "Validation loss after the job's last epoch"),
    "esper_job_val_accuracy_ratio": ("gauge", "Validation accuracy after the last epoch (0..1)"),
    "esper_job_samples_per_second": ("gauge", "Training throughput of the last epoch"),
    "esper_job_step_loss": ("gauge", "Training loss of the job's last sampled step"),
    "esper_job_seed_parameters": (
        "gauge",
        "Parameters the job's seeds add (kernels of its ACTIVE and RETIRING seeds)",
    ),
    "esper_job_last_report_timestamp_seconds": ("gauge", "When the job's last telemetry was sent"),
    "esper_job_seeds": ("gauge", "The job's seed slots by lifecycle state"),
    "esper_seed_alpha": ("gauge", "A seed's blend weight alpha (0..1)"),
    "esper_seed_contribution": (
        "gauge",
        "A seed's measured contribution: validation accuracy with it minus without it",
    ),
    "esper_seed_state": ("gauge", "1 for the seed slot's current lifecycle state"),
}

#: Counters: name (without `_total`) → (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "esper_training_steps": (
        "Optimizer steps trained, summed over jobs (from the steps telemetry says were done; "
        "samples are not counted: no message carries a batch size)",
        (),
    ),
    "esper_decisions": ("Control decisions published, by action", ("action",)),
    "esper_decision_outcomes": (
        "Control decisions answered by their job, by action, outcome (applied, refused) and the "
        "refusal's code (empty when applied)",
        ("action", "outcome", "code"),
    ),
    "esper_decision_points_answered": (
        "Decision points the controller answered (control.answer), by answer: decisions, or "
        "nothing",
        ("answer",),
    ),
    "esper_decision_points_missed": (
        "Decision points a job went past without an answer, by reason (timeout, no_controller)",
        ("reason",),
    ),
    "esper_seed_transitions": (
        "Seed lifecycle transitions, by from and to state",
        ("from_state", "to_state"),
    ),
    "esper_kernels_ready": (
        "Kernels Urza announced (kernel.ready: compiled or uploaded), by format",
        ("format",),
    ),
    "esper_kernel_cache_hits": (
        "Kernel cache hits in job processes, by tier (from their heartbeats)",
        ("tier",),
    ),
    "esper_kernel_cache_misses": (
        "Kernel cache misses in job processes, by tier (from their heartbeats)",
        ("tier",),
    ),
    "esper_bus_messages": ("Bus messages Nissa consumed, by topic and type", ("topic", "type")),
    "esper_bus_dead_lettered": (
        "Records added to the dead-letter stream since Nissa started, by source topic, consumer "
        "group and reason",
        ("topic", "group", "reason"),
    ),
    "esper_jobs_finished": ("Jobs that ended, by final status", ("status",)),
    "esper_jobs_queued": ("Jobs queued for a worker (job.queued messages)", ()),
    "esper_nissa_handler_errors": (
        "Messages Nissa failed to fold into its state (a bug in Nissa; logged), by type",
        ("type",),
    ),
    "esper_nissa_jobs_dropped": (
        "Jobs Nissa stopped tracking, by reason (retention, idle, capacity)",
        ("reason",),
    ),
    "esper_nissa_refused": (
        "Things Nissa refused to keep to stay bounded: a service past max_services, a dropped "
        "job's report when more than max_jobs wait to be written",
        ("what",),
    ),
}

#: Counters whose label values are a known closed set: each series is exposed from 0, so that
#: increase() works from the first event and dashboards find the series before it.
KNOWN_SERIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "esper_jobs_finished": tuple((s,) for s in ENDINGS),
    "esper_decision_points_answered": tuple((a,) for a in ANSWERS),
    "esper_decision_points_missed": tuple((r,) for r in MISSED_REASONS),
}


def _number(value: float) -> str:
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, labels: Sequence[tuple[str, str]], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        return f"{name}{{{inner}}} {_number(value)}\n"
    return f"{name} {_number(value)}\n"


def _header(name: str, kind: str, doc: str) -> str:
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _histogram(
    name: str, doc: str, histogram: WeightedHistogram, label_names: Sequence[str]
) -> str:
    parts = [_header(name, "histogram", doc)]
    bounds = [*(_number(b) for b in histogram.bounds), "+Inf"]
    for values, counts in histogram.counts.items():
        labels = list(zip(label_names, values, strict=True))
        cumulative = 0
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            parts.append(_line(f"{name}_bucket", [*labels, ("le", bound)], cumulative))
        parts.append(_line(f"{name}_count", labels, cumulative))
        parts.append(_line(f"{name}_sum", labels, histogram.sums[values]))
    return "".join(parts)


def job_lines(job: Job, params: int | None) -> dict[str, str]:
    """One job's lines of each per-job family."""
    j = ("job_id", job.job_id)
    out = dict.fromkeys(JOB_FAMILIES, "")
    out["esper_job_status"] = _line("esper_job_status", [j, ("status", job.status)], 1)
    out["esper_job_epoch"] = _line("esper_job_epoch", [j], job.epochs_completed)
    out["esper_job_step"] = _line("esper_job_step", [j], job.step)
    for name, value in (
        ("esper_job_train_loss", job.train_loss),
        ("esper_job_val_loss", job.val_loss),
        ("esper_job_val_accuracy_ratio", job.val_accuracy),
        ("esper_job_samples_per_second", job.samples_per_s),
        ("esper_job_step_loss", job.step_loss),
        ("esper_job_seed_parameters", params),
        ("esper_job_last_report_timestamp_seconds", job.last_report_ts),
    ):
        # None stays out: a metric that was not measured reads as missing, never as 0.
        if value is not None:
            out[name] = _line(name, [j], value)
    counts = dict.fromkeys(COUNTED_SEED_STATES, 0)
    alpha, contribution, state = [], [], []
    for seed in job.seeds.values():
        if seed.state in counts:
            counts[seed.state] += 1
        slot = [j, ("layer", seed.layer), ("seed", str(seed.seed))]
        state.append(_line("esper_seed_state", [*slot, ("state", seed.state)], 1))
        if seed.alpha is not None:
            alpha.append(_line("esper_seed_alpha", slot, seed.alpha))
        if seed.contribution is not None:
            contribution.append(_line("esper_seed_contribution", slot, seed.contribution))
    out["esper_job_seeds"] = "".join(
        _line("esper_job_seeds", [j, ("state", s)], n) for s, n in counts.items()
    )
    out["esper_seed_alpha"] = "".join(alpha)
    out["esper_seed_contribution"] = "".join(contribution)
    out["esper_seed_state"] = "".join(state)
    return out


class Exposition:
    """Renders Nissa's metrics; keeps each job's lines until the job (or a kernel size) changes."""

    def __init__(self, state: NissaState) -> None:
        self.state = state
        self._cache: dict[str, tuple[tuple[int, int], dict[str, str]]] = {}

    def render(self) -> str:
        return "".join(self._jobs()) + self._counters() + self._services() + self._bus()

    # ------------------------------------------------------------------- jobs
    def _current(self) -> list[tuple[Job, dict[str, str]]]:
        state = self.state
        now = state.now()
        retention = state.settings.retention_s
        kernels = state.kernels_version
        current = []
        fresh: dict[str, tuple[tuple[int, int], dict[str, str]]] = {}
        for job in state.jobs.values():
            if job.finished_at is not None and now - job.finished_at > retention:
                continue  # due for housekeeping: already out of the series
            key = (job.version, kernels)
            cached = self._cache.get(job.job_id)
            if cached is None or cached[0] != key:
                cached = (key, job_lines(job, parameters_added(job, state.kernels)))
            fresh[job.job_id] = cached
            current.append((job, cached[1]))
        self._cache = fresh  # dropped jobs leave the cache with their series
        return current

    def _jobs(self) -> Iterable[str]:
        current = self._current()
        by_status = dict.fromkeys(REPORT_STATUSES, 0)
        for job, _ in current:
            by_status[job.status] += 1
        yield _header(
            "esper_jobs", "gauge", "Jobs Nissa tracks, by status (finished: until retention)"
        )
        for status, count in by_status.items():
            yield _line("esper_jobs", [("status", status)], count)
        for name, (kind, doc) in JOB_FAMILIES.items():
            yield _header(name, kind, doc)
            for _, lines in current:
                yield lines[name]

    # --------------------------------------------------------------- counters
    def _counters(self) -> str:
        state = self.state
        parts = []
        for name, (doc, label_names) in COUNTERS.items():
            parts.append(_header(f"{name}_total", "counter", doc))  # as prometheus_client does
            series = dict(state.counters.get(name, {}))
            if name in KNOWN_SERIES:
                for values in KNOWN_SERIES[name]:
                    series.setdefault(values, 0.0)
            elif not label_names:
                series.setdefault((), 0.0)
            for values, value in series.items():
                labels = list(zip(label_names, values, strict=True))
                parts.append(_line(f"{name}_total", labels, value))
        parts.append(
            _histogram(
                "esper_training_step_duration_seconds",
                "Training step time: wall time between two step reports of one epoch over the "
                "steps between them, observed once per step",
                state.step_time,
                (),
            )
        )
        parts.append(
            _histogram(
                "esper_decision_latency_seconds",
                "From a control decision's publication to its job's decision_taken event",
                state.decision_latency,
                ("action",),
            )
        )
        return "".join(parts)

    # --------------------------------------------------------------- services
    def _services(self) -> str:
        health = self.state.services
        now = self.state.now()
        up = [
            _header(
                "esper_service_up",
                "gauge",
                "1 while at least one instance of the service beats on time, else 0",
            )
        ]
        instances = [
            _header(
                "esper_service_instances",
                "gauge",
                "Known instances of the service by health: ok, degraded (alive, a readiness "
                "check fails), down (missed beats, or said down)",
            )
        ]
        last = [
            _header(
                "esper_service_last_heartbeat_timestamp_seconds",
                "gauge",
                "When the service's latest heartbeat was sent",
            )
        ]
        for service in health.services.values():
            counts = {"ok": 0, "degraded": 0, "down": 0}
            for instance in service.instances.values():
                alive = instance.up(now, health.down_after_beats)
                counts[instance.status if alive else "down"] += 1
            s = ("service", service.name)
            up.append(_line("esper_service_up", [s], 1 if counts["ok"] + counts["degraded"] else 0))
            for status, count in counts.items():
                instances.append(_line("esper_service_instances", [s, ("status", status)], count))
            last.append(
                _line("esper_service_last_heartbeat_timestamp_seconds", [s], service.last_beat)
            )
        return "".join(up + instances + last)

    # -------------------------------------------------------------------- bus
    def _bus(self) -> str:
        bus = self.state.bus
        lag = [
            _header(
                "esper_bus_consumer_lag_messages",
                "gauge",
                "Entries of a topic's stream not yet delivered to a consumer group",
            )
        ]
        pending = [
            _header(
                "esper_bus_consumer_pending_messages",
                "gauge",
                "Entries delivered to a consumer group and not yet acknowledged",
            )
        ]
        for (topic, group), stat in bus.groups.items():
            labels = [("topic", topic), ("group", group)]
            if stat.lag is not None:
                lag.append(_line("esper_bus_consumer_lag_messages", labels, stat.lag))
            pending.append(_line("esper_bus_consumer_pending_messages", labels, stat.pending))
        length = [
            _header("esper_bus_stream_length_messages", "gauge", "Entries in a topic's stream")
        ]
        for topic, count in bus.streams.items():
            length.append(_line("esper_bus_stream_length_messages", [("topic", topic)], count))
        dead = [
            _header(
                "esper_bus_dead_letter_length_messages",
                "gauge",
                "Entries in the dead-letter stream",
            )
        ]
        if bus.dead_letter_length is not None:
            dead.append(_line("esper_bus_dead_letter_length_messages", [], bus.dead_letter_length))
        ok = [
            _header(
                "esper_nissa_bus_read_success",
                "gauge",
                "1 when Nissa's last read of the streams succeeded",
            ),
            _line("esper_nissa_bus_read_success", [], 1 if bus.ok else 0),
        ]
        return "".join(lag + pending + length + dead + ok)

"""NissaState and the report page on their own, with a clock the test sets: the folding rules
whose timing a process test could only hit by luck (eviction order, retention edges, a cache
counter that restarts, out-of-order status), and the page's corner cases."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esper.contracts import (
    ControlDecision,
    DecisionTaken,
    Heartbeat,
    JobStatusChanged,
    SeedStats,
    SeedTransition,
    TelemetryReport,
)
from nissa.jobs import thin
from nissa.metrics import Exposition
from nissa.report_html import render
from nissa.settings import NissaSettings
from nissa.state import NissaState


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **settings: object) -> NissaState:
    return NissaState(NissaSettings(heartbeat=False, **settings), clock=clock)  # type: ignore[arg-type]


def report(
    job: str, step: int, kind: str = "step", epoch: int = 0, **fields: object
) -> TelemetryReport:
    return TelemetryReport(job_id=job, epoch=epoch, step=step, kind=kind, **fields)  # type: ignore[arg-type]


def series(state: NissaState) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(Exposition(state).render()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_the_job_bound_drops_finished_jobs_first_then_the_least_recently_heard() -> None:
    clock = Clock()
    state = make(clock, max_jobs=3)
    for job in ("a", "b", "c"):
        state.on_telemetry(report(job, 1), clock.now)
        clock.now += 1
    state.on_job_status(JobStatusChanged(job_id="b", status="FAILED"), clock.now)
    state.on_telemetry(report("a", 2), clock.now)  # a was heard again: c is now the oldest
    state.on_telemetry(report("d", 1), clock.now)
    assert set(state.jobs) == {"a", "c", "d"}  # the finished job went first
    state.on_telemetry(report("e", 1), clock.now)
    assert set(state.jobs) == {"a", "d", "e"}
    assert state.counters["esper_nissa_jobs_dropped"][("capacity",)] == 2
    assert "b" in state.unsaved  # a job with a known status keeps its report


def test_retention_and_idle_edges() -> None:
    clock = Clock()
    state = make(clock, retention_s=10, idle_retention_s=100)
    state.on_job_status(JobStatusChanged(job_id="done", status="SUCCEEDED"), clock.now)
    state.on_telemetry(report("quiet", 1), clock.now)
    clock.now += 10
    state.housekeeping()
    assert set(state.jobs) == {"done", "quiet"}  # exactly at retention: kept
    clock.now += 0.001
    assert "done" not in {labels["job_id"] for labels, _ in series(state)["esper_job_epoch"]}
    state.housekeeping()
    assert set(state.jobs) == {"quiet"}
    clock.now += 90
    state.housekeeping()
    assert not state.jobs
    # A message dated in the future counts as now: it cannot keep a job alive past its time.
    state.on_telemetry(report("future", 1), clock.now + 1e6)
    clock.now += 100.001
    state.housekeeping()
    assert not state.jobs


def test_a_late_status_never_undoes_a_newer_one_and_an_ending_counts_once() -> None:
    clock = Clock()
    state = make(clock)
    t = clock.now - 50
    state.on_job_status(JobStatusChanged(job_id="j", status="SUCCEEDED", previous="RUNNING"), t)
    state.on_job_status(JobStatusChanged(job_id="j", status="RUNNING", previous="PENDING"), t - 5)
    state.on_job_status(JobStatusChanged(job_id="j", status="SUCCEEDED", previous="RUNNING"), t)
    assert state.jobs["j"].status == "SUCCEEDED"
    assert state.counters["esper_jobs_finished"] == {("SUCCEEDED",): 1.0}


def test_step_time_is_weighted_by_steps_and_skips_epoch_ends() -> None:
    clock = Clock()
    state = make(clock)
    t = clock.now - 100
    state.on_telemetry(report("j", 0), t)
    state.on_telemetry(report("j", 10), t + 1.0)  # 10 steps in 1 s
    state.on_telemetry(report("j", 12), t + 1.4)  # 2 steps in 0.4 s
    state.on_telemetry(report("j", 14, kind="epoch"), t + 3.0)  # evaluation: no interval
    state.on_telemetry(report("j", 15, epoch=1), t + 3.5)
    state.on_telemetry(report("j", 15, epoch=1), t + 3.6)  # a duplicate: nothing
    state.on_telemetry(report("j", 5), t + 1.2)  # a late report: nothing
    assert state.step_time.counts[()][-1] == 0
    assert sum(state.step_time.counts[()]) == 12
    assert state.step_time.sums[()] == pytest.approx(1.4)
    # 0.1 s steps (10 of them) land in the 0.1 bucket, 0.2 s steps (2) in the 0.25 one
    buckets = dict(zip(state.step_time.bounds, state.step_time.counts[()], strict=False))
    assert (buckets[0.1], buckets[0.25]) == (10, 2)
    assert state.counters["esper_training_steps"][()] == 15


def test_cache_counters_survive_restarts_and_baseline_processes_older_than_nissa() -> None:
    clock = Clock()
    state = make(clock)
    start = clock.now

    def beat(instance: str, started: float, hits: int, at: float) -> None:
        message = Heartbeat(
            service="tolaria-job",
            instance=instance,
            status="ok",
            started_at=started,
            interval_s=5,
            details={"cache.redis.hits": hits},
        )
        state.on_heartbeat(message, at)

    beat("old", start - 60, 40, start)  # running before Nissa started: a baseline
    beat("old", start - 60, 45, start + 5)
    beat("new", start + 1, 3, start + 6)
    beat("new", start + 20, 1, start + 25)  # restarted: 1 more, not −2
    assert state.counters["esper_kernel_cache_hits"][("redis",)] == 5 + 3 + 1
    assert not state.services.services  # job processes are not services


def test_seed_state_follows_the_newest_word_and_absence_from_a_report_means_dormant() -> None:
    clock = Clock()
    state = make(clock)
    t = clock.now - 100
    stats = SeedStats(layer="l", seed=1, state="ACTIVE", alpha=0.5)
    state.on_telemetry(report("j", 5, seeds=[stats]), t + 2)
    retire = SeedTransition(
        job_id="j",
        layer="l",
        seed=1,
        from_state="ACTIVE",
        to_state="RETIRING",
        reason="poor",
        occurred_at=t + 3,
    )
    state.on_transition(retire, t + 3)
    state.on_telemetry(report("j", 4, seeds=[stats]), t + 1)  # older than the transition
    assert state.jobs["j"].seeds[("l", 1)].state == "RETIRING"
    state.on_telemetry(report("j", 9), t + 4)  # lists no seed: every seed is DORMANT
    seed = state.jobs["j"].seeds[("l", 1)]
    assert (seed.state, seed.alpha) == ("DORMANT", 0.0)


def test_decision_latency_whichever_half_arrives_first() -> None:
    clock = Clock()
    state = make(clock)
    t = clock.now - 100
    decision = ControlDecision(
        decision_id="d1", job_id="j", action="keep", layer="l", seed=0, reason="good"
    )
    taken = DecisionTaken(
        decision_id="d1", job_id="j", action="keep", outcome="applied", reason="ok", layer="l"
    )
    state.on_decision_taken(taken, t + 2.5)
    state.on_decision(decision, t + 2.0)
    state.on_decision(decision, t + 2.0)
    assert state.decision_latency.sums[("keep",)] == pytest.approx(0.5)
    assert sum(state.decision_latency.counts[("keep",)]) == 1
    assert state.counters["esper_decisions"] == {("keep",): 1.0}


def test_answers_are_counted_by_their_refusal_code() -> None:
    clock = Clock()
    state = make(clock)
    germinate = ControlDecision(
        decision_id="d1", job_id="j", action="germinate", layer="l", blueprint="bp", reason="x"
    )
    state.on_decision_taken(DecisionTaken.refused(germinate, "no_free_slot", "full"), clock.now)
    applied = DecisionTaken(
        decision_id="d2", job_id="j", action="keep", outcome="applied", reason="ok", layer="l"
    )
    state.on_decision_taken(applied, clock.now)
    assert state.counters["esper_decision_outcomes"] == {
        ("germinate", "refused", "no_free_slot"): 1.0,
        ("keep", "applied", ""): 1.0,
    }


def test_thin_keeps_a_long_curve_bounded_with_its_newest_points() -> None:
    points = list(range(101))
    dropped = thin(points, 100)
    assert len(points) == 76 and dropped == 25
    assert points[-51:] == list(range(50, 101))
    assert thin(points, 100) == 0


def test_the_page_renders_corner_cases_and_escapes_names() -> None:
    clock = Clock()
    state = make(clock)
    state.on_telemetry(report("empty", 0), clock.now)
    page = render(state.jobs["empty"].to_report({}))
    for chart, empty in [
        ("loss-chart", "no loss reported yet"),
        ("accuracy-chart", "no validation accuracy reported yet"),
        ("seed-timeline", "no seed was germinated"),
    ]:
        assert f'id="{chart}" class="chart empty"' in page and empty in page
    nasty = '<script>alert("x")</script>'
    state.on_transition(
        SeedTransition(
            job_id="odd",
            layer=nasty,
            seed=0,
            from_state="DORMANT",
            to_state="ALLOCATED",
            reason=nasty,
        ),
        clock.now - 5,
    )
    state.on_telemetry(report("odd", 3, kind="epoch", train_loss=1e6, val_accuracy=1.0), clock.now)
    page = render(state.jobs["odd"].to_report({}))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'class="segment state-ALLOCATED"' in page  # placed by time: it carried no step

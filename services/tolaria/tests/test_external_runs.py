"""External runs through a real Tolaria and Redis (esper.contracts.runs): a run registers as a
job, reports, gets the controller's answer at its decision points (a test controller beats
and answers on the bus, as Tamiyo does), is stopped, ends — and what Tolaria refuses of it
leaves the job as it was."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from jobhelpers import TOKEN, spirals_job, wait_for

from esper.bus import FIELD, BusSettings
from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    Envelope,
    Heartbeat,
    JobStatusChanged,
    Message,
    SeedTransition,
    TelemetryReport,
)
from esper.testing import RedisServer, ServiceProcess

EXTERNAL = {
    "name": "my-loop",
    "model": {"kind": "external", "description": "a Conv1d of mine"},
    "dataset": {"kind": "external"},
    "training": {"epochs": 4},
    "morphogenesis": {"decision_timeout_s": 5.0},
}


def report(job_id: str, epoch: int, step: int, *, point: bool = False, **metrics: float) -> Any:
    built = TelemetryReport.from_measurements(
        job_id=job_id,
        epoch=epoch,
        step=step,
        kind="epoch" if point else "step",
        metrics=dict(metrics),  # type: ignore[arg-type]
        decision_point=point,
    )
    return {"report": built.model_dump(mode="json")}


def register(client: httpx.Client, **overrides: Any) -> str:
    answer = client.post("/jobs", json={**EXTERNAL, **overrides})
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "RUNNING"
    job_id: str = answer.json()["job_id"]
    return job_id


def events(job_id: str, stack_redis: RedisServer, prefix: str) -> list[str]:
    """The types in the job's event stream (read from Redis: the SSE route stays open while the
    job runs)."""
    with redis.Redis.from_url(stack_redis.url) as r:
        entries: Any = r.xrange(f"{prefix}:job:{job_id}:events")
    return [Envelope.decode(fields[FIELD]).type for _, fields in entries]


class FakeTamiyo:
    """Beats on the health topic and answers each decision point of `job_id` with `decisions`."""

    def __init__(self, redis_url: str, prefix: str, decisions: list[ControlDecision]) -> None:
        self.bus = BusSettings(redis_url=redis_url, prefix=prefix)
        self.redis = redis.Redis.from_url(redis_url)
        self.decisions = decisions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)

    def publish(self, message: Message) -> None:
        envelope = Envelope.wrap(message, source="tamiyo")
        self.redis.xadd(self.bus.stream(envelope.topic), {FIELD: envelope.encode()})

    def __enter__(self) -> FakeTamiyo:
        self.publish(
            Heartbeat(
                service="tamiyo",
                instance="fake",
                status="ok",
                started_at=time.time(),
                interval_s=60.0,
            )
        )
        last: Any = self.redis.xrevrange(self.bus.stream("telemetry"), count=1)
        self._last: Any = last[0][0] if last else "0-0"
        self._thread.start()
        return self

    def leave(self) -> None:
        """Stop answering, and say so on the health topic: no controller is alive after it."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.publish(
            Heartbeat(
                service="tamiyo", instance="fake", status="down", started_at=0, interval_s=60.0
            )
        )

    def __exit__(self, *exc: object) -> None:
        self.leave()
        self.redis.close()

    def _answer(self) -> None:
        stream = self.bus.stream("telemetry")
        while not self._stop.is_set():
            found: Any = self.redis.xread({stream: self._last}, block=20)
            for _, entries in found or []:
                for entry_id, fields in entries:
                    self._last = entry_id
                    seen = Envelope.decode(fields[FIELD]).message()
                    if isinstance(seen, TelemetryReport) and seen.decision_point:
                        mine = [d for d in self.decisions if d.job_id == seen.job_id]
                        self.publish(
                            ControlAnswer(
                                job_id=seen.job_id,
                                epoch=seen.epoch,
                                step=seen.step,
                                kind=seen.kind,
                                decisions=mine,
                                note="fake answer",
                            )
                        )


@pytest.fixture(scope="module")
def fake_tamiyo(stack_redis: RedisServer, prefix: str) -> Iterator[FakeTamiyo]:
    with FakeTamiyo(stack_redis.url, prefix, []) as fake:
        yield fake


def test_a_run_registers_reports_gets_its_answers_and_ends(
    client: httpx.Client, fake_tamiyo: FakeTamiyo, stack_redis: RedisServer, prefix: str
) -> None:
    job_id = register(client)
    view = client.get(f"/jobs/{job_id}").json()
    assert view["attempts"][0]["worker"] == "external" and view["progress"]["epochs"] == 4
    # Not queued: no worker ever picks it up (it would fail to build an `external` model).
    assert job_id in [j["job_id"] for j in client.get("/jobs?status=RUNNING").json()["items"]]

    germinate = ControlDecision(
        decision_id="d-1",
        job_id=job_id,
        action="germinate",
        layer="0",
        blueprint="widen",
        reason="test",
    )
    fake_tamiyo.decisions.append(germinate)
    transition = SeedTransition(
        job_id=job_id,
        layer="0",
        seed=0,
        from_state="DORMANT",
        to_state="ALLOCATED",
        reason="germinate",
    )
    step = client.post(f"/jobs/{job_id}/reports", json=report(job_id, 0, 5, train_loss=1.0))
    assert step.status_code == 200 and step.json()["answered"] is False
    point = client.post(
        f"/jobs/{job_id}/reports",
        json={
            **report(job_id, 0, 10, point=True, train_loss=0.9, val_accuracy=0.5),
            "events": [Envelope.wrap(transition, source="session", job_id=job_id).model_dump()],
            "logs": ["epoch 0 done"],
        },
    )
    assert point.status_code == 200, point.text
    reply = point.json()
    assert reply["answered"] is True and reply["note"] == "fake answer"
    assert [d["decision_id"] for d in reply["decisions"]] == ["d-1"]

    view = client.get(f"/jobs/{job_id}").json()
    assert view["progress"]["epoch"] == 1 and view["progress"]["step"] == 10
    assert view["metrics"]["val_accuracy"] == 0.5 and view["metrics"]["best_epoch"] == 0
    assert client.get(f"/jobs/{job_id}/logs").text == "epoch 0 done\n"

    ended = client.post(f"/jobs/{job_id}/end", json={"status": "SUCCEEDED"})
    assert ended.status_code == 200 and ended.json()["status"] == "SUCCEEDED"
    assert ended.json()["metrics"]["val_accuracy"] == 0.5  # the record's, kept
    again = client.post(f"/jobs/{job_id}/end", json={"status": "FAILED"})
    assert again.json()["status"] == "SUCCEEDED"  # an ended run stays as it ended
    late = client.post(f"/jobs/{job_id}/reports", json=report(job_id, 1, 11))
    assert late.status_code == 409
    kinds = events(job_id, stack_redis, prefix)
    assert kinds[0] == kinds[-1] == "event.job_status"
    assert "event.seed_transition" in kinds and "telemetry.report" in kinds


def test_what_tolaria_refuses_of_a_run_leaves_its_job_as_it_was(
    client: httpx.Client, stack_redis: RedisServer, prefix: str
) -> None:
    job_id = register(client)
    before = client.get(f"/jobs/{job_id}").json()
    count = len(events(job_id, stack_redis, prefix))

    other = client.post(f"/jobs/{job_id}/reports", json=report("someone-else", 0, 1))
    assert other.status_code == 422
    assert other.json()["error"]["location"] == ["body", "report", "job_id"]

    status = JobStatusChanged(job_id=job_id, status="SUCCEEDED", previous="RUNNING", attempt=1)
    forged = client.post(
        f"/jobs/{job_id}/reports",
        json={
            **report(job_id, 0, 1),
            "events": [Envelope.wrap(status, source="session", job_id=job_id).model_dump()],
        },
    )
    assert forged.status_code == 422, forged.text
    assert forged.json()["error"]["location"] == ["body", "events", 0, "type"]
    garbled = client.post(f"/jobs/{job_id}/reports", json={"report": {"job_id": job_id}})
    assert garbled.status_code == 422
    unknown = client.post("/jobs/job-nope/reports", json=report("job-nope", 0, 1))
    assert unknown.status_code == 404
    anonymous = httpx.post(f"{client.base_url}/jobs/{job_id}/reports", json=report(job_id, 0, 1))
    assert anonymous.status_code == 401

    assert client.get(f"/jobs/{job_id}").json() == before
    assert len(events(job_id, stack_redis, prefix)) == count
    half = client.post("/jobs", json={**EXTERNAL, "dataset": {"kind": "moons"}})
    assert half.status_code == 422 and "external" in half.text
    client.post(f"/jobs/{job_id}/end", json={"status": "FAILED", "error": "test over"})


def test_a_job_tolaria_trains_takes_no_run_reports(client: httpx.Client) -> None:
    job_id = client.post("/jobs", json=spirals_job(training={"epochs": 1})).json()["job_id"]
    refused = client.post(f"/jobs/{job_id}/reports", json=report(job_id, 0, 1))
    assert refused.status_code == 409 and "trained by Tolaria" in refused.text
    assert client.post(f"/jobs/{job_id}/end", json={"status": "FAILED"}).status_code == 409
    wait_for(client, job_id, lambda v: v["status"] == "SUCCEEDED")


def test_a_point_with_no_controller_alive_passes_and_a_stop_reaches_the_run(
    client: httpx.Client, fake_tamiyo: FakeTamiyo, stack_redis: RedisServer, prefix: str
) -> None:
    fake_tamiyo.leave()
    job_id = register(client)
    started = time.monotonic()
    point = client.post(f"/jobs/{job_id}/reports", json=report(job_id, 0, 3, point=True))
    assert point.json() == {
        "decisions": [],
        "answered": False,
        "note": "no controller alive",
        "stop_requested": False,
    }
    assert time.monotonic() - started < 5  # nobody to wait for
    assert "event.decision_point_missed" in events(job_id, stack_redis, prefix)

    client.post(f"/jobs/{job_id}/stop").raise_for_status()
    after = client.post(f"/jobs/{job_id}/reports", json=report(job_id, 1, 4, point=True))
    assert after.json()["stop_requested"] is True
    ended = client.post(f"/jobs/{job_id}/end", json={"status": "STOPPED", "error": "asked"})
    assert ended.json()["status"] == "STOPPED"


def test_a_run_that_goes_silent_is_ended_failed(tolaria_factory: Any) -> None:
    quick: ServiceProcess = tolaria_factory(
        TOLARIA_EXTERNAL_IDLE_S="1", TOLARIA_EXTERNAL_SWEEP_S="0.2", TOLARIA_WORKERS="0"
    )
    with httpx.Client(
        base_url=quick.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as client:
        job_id = register(client)
        view = wait_for(client, job_id, lambda v: v["status"] != "RUNNING", timeout_s=30)
        assert view["status"] == "FAILED", view
        assert "no report from the run for 1 s" in view["error"]

"""Through a real Tolaria and Redis: the `event.job_status` (v2) that ends a job carries the job's
final metrics, last and best, the same as its job view — read back from the bus as Nissa reads
them."""

from __future__ import annotations

from typing import Any

import httpx
import redis
from jobhelpers import spirals_job, wait_for

from esper.contracts import Envelope, JobStatusChanged
from esper.testing import RedisServer


def statuses(stack_redis: RedisServer, prefix: str, job_id: str) -> list[Envelope]:
    """Every `event.job_status` envelope of the job on the events topic, oldest first."""
    bus = redis.Redis.from_url(stack_redis.url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = bus.xrange(f"{prefix}:events")  # type: ignore[assignment]
    finally:
        bus.close()
    envelopes = [Envelope.decode(fields[b"envelope"]) for _, fields in entries]
    return [e for e in envelopes if e.type == "event.job_status" and e.job_id == job_id]


def final_event(stack_redis: RedisServer, prefix: str, job_id: str, status: str) -> Envelope:
    ending = [e for e in statuses(stack_redis, prefix, job_id) if e.payload["status"] == status]
    assert len(ending) == 1, ending
    return ending[0]


def test_a_succeeded_job_says_its_last_and_best_metrics_on_the_bus(
    client: httpx.Client, stack_redis: RedisServer, prefix: str
) -> None:
    spec = spirals_job(training={"epochs": 3, "lr": 0.05}, morphogenesis={"enabled": False})
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 120)
    assert view["status"] == "SUCCEEDED", view

    envelope = final_event(stack_redis, prefix, job_id, "SUCCEEDED")
    assert envelope.version == 2
    event = envelope.current()
    assert isinstance(event, JobStatusChanged) and event.metrics is not None
    metrics: dict[str, Any] = event.metrics.model_dump(mode="json")
    assert metrics == view["metrics"]
    assert metrics["test_accuracy"] is not None and metrics["best_test_accuracy"] is not None
    assert metrics["best_epoch"] is not None and 0 <= metrics["best_epoch"] < 3
    assert metrics["parameters"] and metrics["train_flops"]

    # Statuses before the end have none.
    running = [e for e in statuses(stack_redis, prefix, job_id) if e.payload["status"] == "RUNNING"]
    assert running and all(e.payload["metrics"] is None for e in running)


def test_a_stopped_job_says_what_it_had_measured(
    client: httpx.Client, stack_redis: RedisServer, prefix: str
) -> None:
    spec = spirals_job(training={"epochs": 500}, morphogenesis={"enabled": False})
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    wait_for(
        client,
        job_id,
        lambda v: v["status"] == "RUNNING" and v["metrics"]["val_accuracy"] is not None,
        120,
    )
    assert client.post(f"/jobs/{job_id}/stop").status_code == 200
    view = wait_for(client, job_id, lambda v: v["status"] == "STOPPED", 120)

    event = final_event(stack_redis, prefix, job_id, "STOPPED").current()
    assert isinstance(event, JobStatusChanged) and event.metrics is not None
    assert event.metrics.model_dump(mode="json") == view["metrics"]
    assert event.metrics.val_accuracy is not None

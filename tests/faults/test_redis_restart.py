"""Redis killed and restarted a few seconds later (same port, same AOF) while a job trains: the
job rides it out and ends SUCCEEDED, every epoch in its history, its event stream and its logs
exactly once, its record agreeing with its checkpoint; meanwhile the API answers 503 with
Retry-After instead of 500."""

from __future__ import annotations

import json
import time

import httpx
import torch
from faulthelpers import finished, plain_job, wait_for, work_dir

from esper.testing import RedisServer, ServiceProcess

EPOCHS = 30


def epoch_events(client: httpx.Client, job_id: str) -> list[int]:
    """The epochs of the epoch reports in the job's event stream (SSE, ends with the job)."""
    epochs = []
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                envelope = json.loads(line[6:])
                payload = envelope.get("payload", {})
                if envelope.get("type") == "telemetry.report" and payload.get("kind") == "epoch":
                    epochs.append(payload["epoch"])
    return epochs


def test_a_job_rides_out_a_redis_restart(
    bus_redis: RedisServer, tolaria: ServiceProcess, client: httpx.Client
) -> None:
    job_id = client.post("/jobs", json=plain_job(EPOCHS)).json()["job_id"]
    wait_for(client, job_id, lambda v: v["status"] == "RUNNING" and v["progress"]["epoch"] >= 2)
    bus_redis.kill()
    try:
        time.sleep(0.5)
        during = client.get(f"/jobs/{job_id}")
        listing = client.get("/jobs")
        time.sleep(3.5)
    finally:
        bus_redis.restart()
    assert during.status_code == 503, during.text
    assert int(during.headers["Retry-After"]) > 0
    assert during.json()["error"]["type"] == "unavailable"
    assert listing.status_code == 503 and "Retry-After" in listing.headers

    view = wait_for(client, job_id, finished, timeout_s=180)
    assert view["status"] == "SUCCEEDED", view
    assert [a["exit_code"] for a in view["attempts"]] == [0]  # no restart was needed
    state = torch.load(work_dir(tolaria) / "jobs" / job_id / "checkpoint.pt", weights_only=True)
    assert view["progress"]["epoch"] == state["epoch"] == EPOCHS
    assert [entry["epoch"] for entry in state["history"]] == list(range(EPOCHS))
    assert epoch_events(client, job_id) == list(range(EPOCHS))
    logs = client.get(f"/jobs/{job_id}/logs").text
    logged = [
        int(line.split("tolaria.job: epoch ")[1].split("/")[0])
        for line in logs.splitlines()
        if "tolaria.job: epoch " in line
    ]
    assert logged == list(range(1, EPOCHS + 1)), logs[-3000:]

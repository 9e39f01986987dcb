"""A job's process killed (SIGKILL, as the kernel's OOM killer does): the worker starts it again
from its checkpoint, up to `training.max_restarts` times, each attempt's exit in the job view."""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import torch
from faulthelpers import finished, plain_job, wait_for, work_dir

from esper.testing import ServiceProcess

EPOCHS = 30


def kill_runner(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """SIGKILL the job's process once it has a checkpoint; the view it was found in."""
    view = wait_for(
        client,
        job_id,
        lambda v: v["status"] == "RUNNING" and v["progress"]["epoch"] >= 2 and v["attempts"],
    )
    running = view["attempts"][-1]
    assert running["ended_at"] is None and running["worker"] == view["worker"]
    os.kill(running["pid"], signal.SIGKILL)
    return view


def test_a_killed_job_process_is_restarted_from_its_checkpoint(
    tolaria: ServiceProcess, client: httpx.Client
) -> None:
    job_id = client.post("/jobs", json=plain_job(EPOCHS)).json()["job_id"]
    killed = kill_runner(client, job_id)
    view = wait_for(client, job_id, finished, timeout_s=180)
    assert view["status"] == "SUCCEEDED", view
    first, second = view["attempts"]
    assert first["pid"] == killed["attempts"][-1]["pid"]
    assert first["exit_code"] == -signal.SIGKILL and "SIGKILL" in first["reason"]
    assert second["exit_code"] == 0 and second["attempt"] == first["attempt"] + 1
    assert view["attempt"] == 2
    logs = client.get(f"/jobs/{job_id}/logs").text
    assert "resumed from the checkpoint of epoch" in logs
    state = torch.load(work_dir(tolaria) / "jobs" / job_id / "checkpoint.pt", weights_only=True)
    assert view["progress"]["epoch"] == state["epoch"] == EPOCHS
    assert [entry["epoch"] for entry in state["history"]] == list(range(EPOCHS))


def test_with_no_restarts_left_the_job_fails_with_the_attempt_s_reason(
    client: httpx.Client,
) -> None:
    job_id = client.post("/jobs", json=plain_job(EPOCHS, max_restarts=0)).json()["job_id"]
    kill_runner(client, job_id)
    view = wait_for(client, job_id, finished, timeout_s=120)
    assert view["status"] == "FAILED", view
    (only,) = view["attempts"]
    assert only["exit_code"] == -signal.SIGKILL and "SIGKILL" in only["reason"]
    assert "SIGKILL" in view["error"] and "max_restarts" in view["error"]


def test_max_restarts_is_bounded(client: httpx.Client) -> None:
    response = client.post("/jobs", json=plain_job(2, max_restarts=11))
    assert response.status_code == 422
    assert response.json()["error"]["location"] == ["body", "training", "max_restarts"]

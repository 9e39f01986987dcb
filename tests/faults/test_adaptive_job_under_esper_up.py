"""`esper up`'s children killed while an adaptive job runs under it (the installed entry point,
in a subprocess): Tamiyo SIGKILLed once a seed trains, then Tolaria — its API and the worker
that started the job's process — SIGKILLed. `esper up` restarts each; the job is resumed from its
checkpoint and comes through whole (`adaptive.assert_came_through`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from adaptive import POLICY, adaptive_job, assert_came_through, job_record
from faulthelpers import finished, wait_for

from esper.testing.esper_up import esper_up, gone, wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds esper up's children through /proc"
)


def test_tamiyo_and_tolaria_killed_during_an_adaptive_job(tmp_path: Path) -> None:
    # A restarted Tolaria claims the job its killed self left once the queue entry has been
    # idle this long (15 s by default).
    env = {**POLICY, "TOLARIA_WORKERS": "1", "TOLARIA_JOB_CLAIM_IDLE_MS": "2000"}
    with esper_up(tmp_path, services="urza,tolaria,tamiyo", env=env) as up:
        client = httpx.Client(base_url=f"http://127.0.0.1:{up.ports['tolaria']}", timeout=60)
        submitted = client.post("/jobs", json=adaptive_job("under-esper-up"))
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]

        wait_for(client, job_id, lambda v: bool(v["seeds"]), what="a seed germinated")
        tamiyo = up.pid_of("tamiyo")
        os.kill(tamiyo, signal.SIGKILL)
        wait_until(lambda: gone(tamiyo), 5, "tamiyo killed")
        wait_until(lambda: up.healthy("tamiyo"), 90, "tamiyo restarted by esper up")

        view = wait_for(client, job_id, lambda v: v["progress"]["epoch"] >= 8, what="training on")
        tolaria = up.pid_of("tolaria")
        os.kill(tolaria, signal.SIGKILL)
        wait_until(lambda: gone(tolaria), 5, "tolaria killed")
        wait_until(lambda: up.healthy("tolaria"), 90, "tolaria restarted by esper up")

        wait_for(client, job_id, finished, timeout_s=300, what="finished")
        record = job_record(client, up.redis_url, "esper", job_id)
        client.close()
    assert_came_through(record)
    assert record.view["attempt"] > view["attempt"], record.view["attempts"]
    assert "resumed from the checkpoint of epoch" in record.logs
    output = up.output()
    assert "tamiyo exited (SIGKILL)" in output and "tolaria exited (SIGKILL)" in output

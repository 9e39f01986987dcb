"""Faults during an adaptive job, with Tamiyo and Urza in the loop (the local stack, every
process real): Urza away when a germination needs its kernel, Redis killed and restarted, the
job's process SIGKILLed. Each job must come through whole (`adaptive.assert_came_through`).
The faults to `esper up`'s own children are in test_adaptive_job_under_esper_up.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from adaptive import POLICY, adaptive_job, assert_came_through, germinated, job_record
from faulthelpers import finished, logs, wait_for

from esper.stack import LocalStack

PREFIX = "adaptive-faults"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {
        **POLICY,
        "TOLARIA_WORKERS": "1",
        "OMP_NUM_THREADS": "1",
        "URZA_LOG_JSON": "false",
        "TOLARIA_LOG_JSON": "false",
        "TAMIYO_LOG_JSON": "false",
    }
    root = tmp_path_factory.mktemp("adaptive-faults")
    with LocalStack(
        root, services=["urza", "tolaria", "tamiyo"], env=env, bus_prefix=PREFIX
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tolaria(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url("tolaria"), timeout=60) as client:
        yield client


def submit(tolaria: httpx.Client, spec: dict[str, object]) -> str:
    response = tolaria.post("/jobs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def test_urza_away_when_a_germination_needs_its_kernel(
    stack: LocalStack, tolaria: httpx.Client
) -> None:
    """First in the module, with a host shape of its own: no kernel for it is cached anywhere,
    so the germination has to reach Urza, and Urza is down until the job has tried."""
    urza = stack.services["urza"]
    job_id = submit(tolaria, adaptive_job("urza-away", hidden=(3, 3)))
    wait_for(tolaria, job_id, lambda v: v["progress"]["epoch"] >= 1, what="training")
    urza.stop()
    try:
        # Tamiyo germinates at the plateau; the job's compile meets Urza away and is retried
        # with backoff, the job waiting (within `morphogenesis.kernel_retry_s`, 30 s).
        wait_for(
            tolaria,
            job_id,
            lambda v: "failed (ServiceUnreachableError" in logs(tolaria, job_id),
            what="a germination that met Urza away",
        )
    finally:
        urza.restart()
    wait_for(tolaria, job_id, finished, what="finished")
    record = job_record(tolaria, stack.redis_url, PREFIX, job_id)
    assert_came_through(record)
    [retried, *_] = record.applied("germinate")
    assert f"decision {retried.decision_id} applied" in record.logs


def test_redis_restarted_while_a_seed_trains(stack: LocalStack, tolaria: httpx.Client) -> None:
    assert stack.redis is not None
    job_id = submit(tolaria, adaptive_job("redis-restart"))
    wait_for(tolaria, job_id, germinated, what="a seed germinated")
    stack.redis.kill()
    try:
        time.sleep(5.0)
    finally:
        stack.redis.restart()
    wait_for(tolaria, job_id, finished, what="finished")
    record = job_record(tolaria, stack.redis_url, PREFIX, job_id)
    assert_came_through(record)


def test_the_job_process_killed_while_a_seed_trains(
    stack: LocalStack, tolaria: httpx.Client
) -> None:
    job_id = submit(tolaria, adaptive_job("runner-killed"))
    # Killed the moment a germination is applied, before the epoch's checkpoint holds it: the
    # restarted process resumes from a checkpoint without the seed, and the seed must not be
    # left half-germinated, counted twice, or believed by Tamiyo to be there.
    view = wait_for(
        tolaria,
        job_id,
        lambda v: "applied: germinated" in logs(tolaria, job_id),
        what="a germination applied",
    )
    os.kill(view["attempts"][-1]["pid"], signal.SIGKILL)
    wait_for(tolaria, job_id, finished, what="finished")
    record = job_record(tolaria, stack.redis_url, PREFIX, job_id)
    assert_came_through(record)
    first, second = record.view["attempts"]
    assert first["exit_code"] == -signal.SIGKILL and second["exit_code"] == 0
    assert "resumed from the checkpoint of epoch" in record.logs

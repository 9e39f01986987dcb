"""Tolaria's `ray` executor against a real 2-node Ray cluster on this machine (`ray start`
processes on loopback, with a token): a job of `distributed.workers: 2` submitted through the API
trains as a Ray Train run, grows in lockstep — every decision executed at the same step on both
ranks, both ranks ending with the same parameters, as they report them — and ends as accurate as
the same job on one worker; a rank killed mid-run is started again by Ray Train and the job
resumes from its checkpoint. And a Tolaria on the local executor refuses several workers."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from esper.stack import SHORT_JOB_POLICY, LocalStack
from esper.testing import free_port

pytest.importorskip("ray.train", reason="tolaria[ray] is not installed")

RAY = Path(sys.executable).parent / "ray"
EPOCHS = 10


def circles_job(workers: int, epochs: int = EPOCHS, **training: Any) -> dict[str, Any]:
    """The closed-loop test's job: a 2-2 tanh MLP that cannot enclose a disc, so Tamiyo grows it."""
    return {
        "name": f"circles-ray-{workers}",
        "model": {"kind": "mlp", "hidden": [2, 2], "activation": "tanh"},
        "dataset": {"kind": "circles", "samples": 2000, "noise": 0.1, "seed": 0},
        "training": {
            "epochs": epochs,
            "batch_size": 32,
            "lr": 0.01,
            "seed": 0,
            "telemetry_every_steps": 10,
            **training,
        },
        "morphogenesis": {"seeds_per_layer": 2, "ramp_steps": 20},
        "distributed": {"workers": workers},
    }


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, str]]:
    """A head and a worker node on loopback; (address, token)."""
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    # Short: Ray's socket paths live under it and a Unix socket path has at most 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    subprocess.run(
        [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--temp-dir", temp, *common],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    try:
        subprocess.run(
            [str(RAY), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", *common],
            env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", token
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ray_stack(
    tmp_path_factory: pytest.TempPathFactory, ray_cluster: tuple[str, str]
) -> Iterator[LocalStack]:
    address, token = ray_cluster
    env = {
        **SHORT_JOB_POLICY,
        "TOLARIA_EXECUTOR": "ray",
        "TOLARIA_RAY_ADDRESS": address,
        "TOLARIA_RAY_AUTH_TOKEN": token,
        "TOLARIA_WORKERS": "1",
        "OMP_NUM_THREADS": "1",
        "TOLARIA_LOG_JSON": "false",
    }
    root = tmp_path_factory.mktemp("raystack")
    with LocalStack(root, services=["urza", "tolaria", "tamiyo"], env=env) as stack:
        yield stack


def wait_for(client: httpx.Client, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if view["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return view
        time.sleep(1)
    logs = client.get(f"/jobs/{job_id}/logs").text[-4000:]
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s\n{logs}")


def submit(client: httpx.Client, spec: dict[str, Any]) -> str:
    answer = client.post("/jobs", json=spec)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["job_id"])


def test_two_ray_workers_grow_in_lockstep_as_accurate_as_one(ray_stack: LocalStack) -> None:
    tolaria = httpx.Client(base_url=ray_stack.url("tolaria"), timeout=30)
    two = wait_for(tolaria, submit(tolaria, circles_job(2)))
    logs = tolaria.get(f"/jobs/{two['job_id']}/logs").text
    assert two["status"] == "SUCCEEDED", logs[-4000:]
    # Both ranks report a digest of their parameters: the same.
    digests = re.search(r"2 ranks, (the same|DIFFERENT) parameters: (\w+), (\w+)", logs)
    assert digests is not None, logs[-3000:]
    assert digests.group(1) == "the same" and digests.group(2) == digests.group(3)
    # Every decision was executed at the same step on both ranks.
    applied = re.findall(r"rank (\d) executed: (.*)", logs)
    assert [rank for rank, _ in applied] == ["0", "1"], logs[-3000:]
    assert applied[0][1] == applied[1][1]
    assert "germinate" in logs and "@" in applied[0][1], logs[-3000:]
    germinated = [s for s in two["seeds"]] or re.findall(r"decision \S+ \(germinate", logs)
    assert germinated, logs[-3000:]

    one = wait_for(tolaria, submit(tolaria, circles_job(1)))
    assert one["status"] == "SUCCEEDED"
    print(
        "val accuracy: 2 workers",
        two["metrics"]["val_accuracy"],
        "1 worker",
        one["metrics"]["val_accuracy"],
        "samples/s",
        two["metrics"]["samples_per_s"],
        one["metrics"]["samples_per_s"],
    )
    # Twice the global batch, half the steps: within noise of one worker.
    assert abs(two["metrics"]["val_accuracy"] - one["metrics"]["val_accuracy"]) < 0.1, (
        two["metrics"],
        one["metrics"],
    )


def test_a_rank_killed_mid_run_resumes_from_the_checkpoint(ray_stack: LocalStack) -> None:
    tolaria = httpx.Client(base_url=ray_stack.url("tolaria"), timeout=30)
    job_id = submit(tolaria, circles_job(2, epochs=14, max_restarts=2))
    deadline = time.monotonic() + 300
    while tolaria.get(f"/jobs/{job_id}").json()["progress"]["epoch"] < 3:
        assert time.monotonic() < deadline, tolaria.get(f"/jobs/{job_id}/logs").text[-3000:]
        time.sleep(0.5)
    victims = ranks_of(job_id)
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    view = wait_for(tolaria, job_id)
    logs = tolaria.get(f"/jobs/{job_id}/logs").text
    assert view["status"] == "SUCCEEDED", logs[-4000:]
    assert "resumed from the checkpoint of epoch" in logs, logs[-4000:]
    history = torch_history(ray_stack, job_id)
    epochs = [h["epoch"] for h in history]
    assert epochs == list(range(14)), epochs  # no epoch trained twice, none missing


def ranks_of(job_id: str) -> list[int]:
    """The pids of the Ray Train worker processes (Ray names its worker processes after the
    actor they host)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line]


def torch_history(stack: LocalStack, job_id: str) -> list[dict[str, Any]]:
    import torch

    tolaria = httpx.Client(base_url=stack.url("tolaria"), timeout=30)
    data = tolaria.get(f"/jobs/{job_id}/checkpoint").content
    path = stack.root / f"{job_id}.pt"
    path.write_bytes(data)
    state = torch.load(path, weights_only=True)
    history: list[dict[str, Any]] = state["history"]
    return history


def test_the_local_executor_refuses_several_workers(full_stack: LocalStack) -> None:
    tolaria = httpx.Client(base_url=full_stack.url("tolaria"), timeout=30)
    refused = tolaria.post("/jobs", json=circles_job(2))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["location"] == ["body", "distributed", "workers"]
    assert "TOLARIA_EXECUTOR=ray" in error["message"]


def test_a_stop_through_the_api_stops_every_rank(ray_stack: LocalStack) -> None:
    tolaria = httpx.Client(base_url=ray_stack.url("tolaria"), timeout=30)
    job_id = submit(tolaria, circles_job(2, epochs=500))
    deadline = time.monotonic() + 300
    while tolaria.get(f"/jobs/{job_id}").json()["progress"]["epoch"] < 1:
        assert time.monotonic() < deadline, tolaria.get(f"/jobs/{job_id}/logs").text[-3000:]
        time.sleep(0.5)
    tolaria.post(f"/jobs/{job_id}/stop").raise_for_status()
    view = wait_for(tolaria, job_id, timeout_s=120)
    logs = tolaria.get(f"/jobs/{job_id}/logs").text
    assert view["status"] == "STOPPED" and view["error"] == "stopped on request", logs[-3000:]
    assert "2 ranks, the same parameters" in logs  # both ranks stopped at the same step
    assert view["progress"]["epoch"] < 500

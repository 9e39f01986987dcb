"""Helpers of Tolaria's tests (imported by name: conftest puts this directory on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings

TOKEN = "tolaria-test-token"


def wait_for(
    client: httpx.Client,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Poll `GET /jobs/{id}` until `done(view)`; fail with the job's logs on timeout."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = client.get(f"/jobs/{job_id}").json()
        if done(view):
            return view
        time.sleep(0.2)
    logs = client.get(f"/jobs/{job_id}/logs").text[-3000:]
    raise AssertionError(f"job {job_id} did not get there in {timeout_s} s: {view}\nlogs:\n{logs}")


def spirals_job(**overrides: Any) -> dict[str, Any]:
    """The growth demo's shape: two spirals and a small tanh MLP (fast on a CPU)."""
    spec: dict[str, Any] = {
        "name": "spirals",
        "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
        "dataset": {"kind": "spirals", "samples": 600, "noise": 0.1, "seed": 1},
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 0},
        "morphogenesis": {"enabled": True, "seeds_per_layer": 2, "ramp_steps": 20},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


@contextmanager
def started(settings: TolariaSettings, job_id: str) -> Iterator[JobRuntime]:
    """A job's bus side (its JobRuntime) in this process, closed at the end: for the tests that
    drive a JobTrainer step by step, with no job process around it."""
    job_runtime = JobRuntime(settings, job_id).start()
    try:
        yield job_runtime
    finally:
        job_runtime.close()

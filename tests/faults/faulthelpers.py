"""Helpers of the fault tests (imported by name: conftest puts this directory on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from esper.testing import ServiceProcess

TOKEN = "faults-test-token"


def plain_job(epochs: int, **training: Any) -> dict[str, Any]:
    """A tiny MLP on two spirals, without morphogenesis: ~0.1 s an epoch on one CPU thread."""
    return {
        "name": "faults",
        "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
        "dataset": {"kind": "spirals", "samples": 600, "noise": 0.1, "seed": 1},
        "training": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "seed": 0, **training},
        "morphogenesis": {"enabled": False},
    }


def wait_for(
    client: httpx.Client,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float = 240,
    what: str = "",
) -> dict[str, Any]:
    """Poll `GET /jobs/{id}` until `done(view)`; a 503 or a refused connection (Redis or a
    service being restarted) is waited through. Fails at once if the job ends first, and with
    the job's logs on timeout."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = client.get(f"/jobs/{job_id}")
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            view = response.json()
            if done(view):
                return view
            if finished(view):
                raise AssertionError(f"job ended before {what or 'the wait'}: {view}")
        time.sleep(0.1)
    raise AssertionError(
        f"job {job_id}: not {what} in {timeout_s} s: {view}\n{logs(client, job_id)[-4000:]}"
    )


def logs(client: httpx.Client, job_id: str) -> str:
    try:
        return client.get(f"/jobs/{job_id}/logs").text
    except httpx.HTTPError as err:
        return f"(logs unavailable: {err})"


def finished(view: dict[str, Any]) -> bool:
    return view["status"] in ("SUCCEEDED", "FAILED", "STOPPED")


def work_dir(tolaria: ServiceProcess) -> Path:
    return Path(tolaria.env["TOLARIA_WORK_DIR"])

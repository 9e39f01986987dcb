"""The same adaptive job, run twice on the local stack — once alone, once while another job
trains beside it on the other worker — decides the same things at the same steps and ends with
the same metrics, to the last bit: decisions take effect only at the job's decision points, where
it waits for Tamiyo's answer to its own report, so a busy machine changes when things happen in
wall-clock time, never at which step."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
import redis

from esper.bus import FIELD
from esper.contracts import DecisionTaken, Envelope, SeedTransition
from esper.stack import LocalStack

JOB_TIMEOUT_S = 400

POLICY = {
    "TAMIYO_WARMUP_EPOCHS": "2",
    "TAMIYO_PATIENCE": "1",
    "TAMIYO_MIN_DELTA": "0.01",
    "TAMIYO_EVALUATION_EPOCHS": "2",
    "TAMIYO_RAMP_STEPS": "20",
    "TAMIYO_RETIRE_RAMP_STEPS": "20",
    "TAMIYO_COOLDOWN_EPOCHS": "1",
}
"""Eager, so that germinations, verdicts and retirements all happen within a short job."""


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    return POLICY


def adaptive(name: str, decide_every_steps: int | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"kind": "mlp", "hidden": [2, 2], "activation": "tanh"},
        "dataset": {"kind": "circles", "samples": 3000, "noise": 0.1, "seed": 3},
        "training": {
            "epochs": 14,
            "batch_size": 16,
            "lr": 0.01,
            "seed": 3,
            "telemetry_every_steps": 10,
        },
        "morphogenesis": {
            "enabled": True,
            "seeds_per_layer": 2,
            "ramp_steps": 20,
            "decide_every_steps": decide_every_steps,
        },
    }


NEIGHBOUR = {
    "name": "neighbour",
    "model": {"kind": "mlp", "hidden": [64, 64]},
    "dataset": {"kind": "blobs", "samples": 20000, "features": 32, "classes": 8, "seed": 1},
    "training": {"epochs": 6, "batch_size": 8, "lr": 0.01, "seed": 1},
    "morphogenesis": {"enabled": False},
}
"""Another job on the other worker: it competes for the CPU the whole time the job trains."""


def submit(client: httpx.Client, spec: dict[str, Any]) -> str:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def wait(client: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        views = {j: client.get(f"/jobs/{j}").json() for j in job_ids}
        if all(v["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for v in views.values()):
            for job_id, view in views.items():
                logs = client.get(f"/jobs/{job_id}/logs").text[-3000:]
                assert view["status"] == "SUCCEEDED", f"{view}\n{logs}"
            return views
        time.sleep(0.5)
    raise AssertionError(f"jobs still running after {JOB_TIMEOUT_S} s")


def growth_of(stack: LocalStack, job_id: str) -> list[tuple[Any, ...]]:
    """What the job did to its seeds, and at which step: every transition and every answer."""
    bus = redis.Redis.from_url(stack.redis_url)
    try:
        entries = bus.xrange(f"{stack.bus_prefix}:events")
    finally:
        bus.close()
    happened: list[tuple[Any, ...]] = []
    for _, fields in entries:
        message = Envelope.decode(fields[FIELD]).current()
        if getattr(message, "job_id", None) != job_id:
            continue
        if isinstance(message, SeedTransition):
            happened.append(
                (message.step, message.layer, message.seed, message.from_state, message.to_state)
            )
        elif isinstance(message, DecisionTaken):
            happened.append((message.action, message.layer, message.seed, message.outcome))
    return happened


def outcome(view: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": {k: v for k, v in view["metrics"].items() if k != "samples_per_s"},
        "seeds": view["seeds"],
        "step": view["progress"]["step"],
    }


@pytest.mark.parametrize("decide_every_steps", [None, 50])
def test_the_same_job_grows_the_same_way_alone_and_beside_another(
    full_stack: LocalStack, decide_every_steps: int | None
) -> None:
    client = httpx.Client(base_url=full_stack.url("tolaria"), timeout=60)
    alone = submit(client, adaptive("alone", decide_every_steps))
    views = wait(client, [alone])
    crowded = submit(client, adaptive("crowded", decide_every_steps))
    neighbour = submit(client, NEIGHBOUR)
    views.update(wait(client, [crowded, neighbour]))
    client.close()

    first, second = growth_of(full_stack, alone), growth_of(full_stack, crowded)
    assert any(h[0] == "germinate" and h[3] == "applied" for h in first), first
    assert first == second
    assert outcome(views[alone]) == outcome(views[crowded])

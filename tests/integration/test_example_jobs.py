"""The example jobs show what they claim, on the local stack with Tamiyo's default policy (not
the shortened one the demo and the closed-loop test run): examples/jobs/circles.yaml grows and
ends clearly better than the same spec with growth off, keeping only seeds that pay."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from esper.contracts import JobSpec
from esper.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.10
JOB_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {"TOLARIA_WORKERS": "2", "OMP_NUM_THREADS": "1"}  # Tamiyo as shipped
    with LocalStack(
        tmp_path_factory.mktemp("examples"), services=["urza", "tolaria", "tamiyo"], env=env
    ) as running:
        yield running


def finish(client: httpx.Client, job_ids: list[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        views = [client.get(f"/jobs/{j}").json() for j in job_ids]
        if all(v["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for v in views):
            return views
        time.sleep(0.5)
    raise AssertionError(f"jobs still running after {JOB_TIMEOUT_S} s")


def test_the_circles_example_grows_and_beats_its_control(stack: LocalStack) -> None:
    spec = JobSpec.from_yaml((ROOT / "examples" / "jobs" / "circles.yaml").read_text())
    control = spec.model_copy(
        update={
            "name": "circles-control",
            "morphogenesis": spec.morphogenesis.model_copy(update={"enabled": False}),
        }
    )
    with httpx.Client(base_url=stack.url("tolaria"), timeout=60) as client:
        job_ids = [
            client.post("/jobs", json=s.model_dump(mode="json")).json()["job_id"]
            for s in (spec, control)
        ]
        grown, plain = finish(client, job_ids)
    for view in (grown, plain):
        assert view["status"] == "SUCCEEDED", view
    with httpx.Client(base_url=stack.url("tamiyo"), timeout=60) as tamiyo:
        page = tamiyo.get("/decisions", params={"job_id": job_ids[0], "limit": 100}).json()
    applied = [r["decision"] for r in page["items"] if r["outcome"] == "applied"]
    kept = [d for d in applied if d["action"] == "keep"]
    assert kept, applied  # growth that paid, and was judged to
    assert all(d["evidence"]["contribution"] > 0 for d in kept), kept
    gain = grown["metrics"]["best_test_accuracy"] - plain["metrics"]["best_test_accuracy"]
    print(f"circles: grown {grown['metrics']}, control {plain['metrics']}, gain {gain:+.3f}")
    assert gain >= MARGIN, (grown["metrics"], plain["metrics"])

"""Bad input at Tolaria's API edges: bodies nested too deeply, a bad `Last-Event-ID`, numbers
that are not numbers, and dataset errors that would tell a client where the data lives. An
API-only replica (no workers) serves them: nothing here needs a job to train."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from jobhelpers import TOKEN, spirals_job

from esper.testing import ServiceProcess


@pytest.fixture(scope="module")
def api(tolaria_factory: Callable[..., ServiceProcess]) -> Iterator[httpx.Client]:
    tolaria = tolaria_factory(TOLARIA_WORKERS="0")
    with httpx.Client(
        base_url=tolaria.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        yield client


def expect_422_at_body(response: httpx.Response, kind: str = "validation_error") -> dict:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert error["location"][:1] == ["body"]
    return error


def test_deeply_nested_bodies_are_422_and_the_connection_stays_usable(api: httpx.Client) -> None:
    jobs_before = api.get("/jobs").json()["items"]
    deep_json = b"[" * 100_000
    response = api.post("/jobs", content=deep_json, headers={"Content-Type": "application/json"})
    expect_422_at_body(response)
    assert api.get("/jobs").status_code == 200  # the same client, the same connection

    deep_yaml = "[" * 900 + "]" * 900
    response = api.post("/jobs", content=deep_yaml, headers={"Content-Type": "application/yaml"})
    expect_422_at_body(response)
    assert api.get("/jobs").json()["items"] == jobs_before


@pytest.mark.parametrize(
    "bad", ["not-an-id", "1-2-3", "-1", "1-", "99999999999999999999999", "1 2", "0x10"]
)
def test_a_bad_last_event_id_is_400_before_the_stream(api: httpx.Client, bad: str) -> None:
    job_id = api.post("/jobs", json=spirals_job(submission_id="events-400")).json()["job_id"]
    with api.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad}) as response:
        response.read()
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "bad_request"
    assert error["location"] == ["header", "last-event-id"]
    assert api.get(f"/jobs/{job_id}").status_code == 200


def test_a_good_last_event_id_resumes_after_it(api: httpx.Client) -> None:
    job_id = api.post("/jobs", json=spirals_job(submission_id="events-ok")).json()["job_id"]
    api.post(f"/jobs/{job_id}/stop")  # a queued job stops at once: the stream then ends
    with api.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "0-0"}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert "event: end" in text


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("training", "epochs", True), ("training", "lr", False), ("dataset", "samples", "600")],
)
def test_numbers_that_are_not_numbers_are_refused(
    api: httpx.Client, section: str, field: str, value: object
) -> None:
    spec = spirals_job()
    spec[section] = {**spec[section], field: value}
    error = expect_422_at_body(api.post("/jobs", json=spec))
    assert error["location"][:2] == ["body", section], error
    assert error["location"][-1] == field, error


def test_dataset_errors_name_paths_relative_to_the_data_dir(
    api: httpx.Client, data_dir: Path
) -> None:
    (data_dir / "sub").mkdir(exist_ok=True)
    (data_dir / "sub" / "broken.npz").write_bytes(b"not an archive")
    np.savez(data_dir / "sub" / "keys.npz", a=np.zeros((4, 2), np.float32))
    cases = {"sub/missing.npz": "sub/missing.npz", "sub/broken.npz": "sub/broken.npz"}
    cases["sub/keys.npz"] = "sub/keys.npz"
    cases["sub"] = "sub"
    for path, shown in cases.items():
        spec = spirals_job()
        spec["dataset"] = {"kind": "npz", "path": path}
        error = expect_422_at_body(api.post("/jobs", json=spec), "invalid_spec")
        message = error["message"]
        assert str(data_dir.resolve()) not in message and str(data_dir) not in message, message
        assert shown in message, message

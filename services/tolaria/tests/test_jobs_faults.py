"""What goes wrong: specs that cannot run (422, nothing queued), a job that fails while training
(FAILED, traceback in its logs, the worker lives on), and a worker killed mid-job (another takes
the job over and resumes it from its checkpoint: every epoch is trained once)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from jobhelpers import spirals_job, wait_for

from esper.testing import RedisServer, ServiceProcess


def queued(stack_redis: RedisServer, prefix: str) -> int:
    return int(redis.Redis.from_url(stack_redis.url).xlen(f"{prefix}:jobs"))


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"model": {"kind": "transformer"}}, ["body", "model"]),
        ({"dataset": {"kind": "imagenet"}}, ["body", "dataset"]),
        ({"training": {"epochs": 0}}, ["body", "training", "epochs"]),
        ({"model": {"kind": "mlp", "hidden": [0]}}, ["body", "model", "mlp", "hidden", 0]),
        ({"morphogenesis": {"layers": ["no_such_layer"]}}, ["body", "morphogenesis", "layers", 0]),
        ({"dataset": {"kind": "npz", "path": "missing.npz"}}, ["body", "dataset", "path"]),
        ({"dataset": {"kind": "npz", "path": "../etc/passwd"}}, ["body", "dataset", "npz", "path"]),
        ({"model": {"kind": "cnn"}}, ["body", "model"]),  # a CNN on 2-D points
    ],
)
def test_a_spec_that_cannot_run_is_refused_and_nothing_is_queued(
    client: httpx.Client, stack_redis: RedisServer, prefix: str, change: dict, location: list
) -> None:
    spec = spirals_job()
    for key, value in change.items():
        spec[key] = value if key in ("model", "dataset") else {**spec[key], **value}
    before, jobs_before = queued(stack_redis, prefix), client.get("/jobs").json()["items"]
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["location"][: len(location)] == location, error
    assert queued(stack_redis, prefix) == before
    assert client.get("/jobs").json()["items"] == jobs_before


def test_a_data_file_of_the_wrong_shape_is_refused(client: httpx.Client, data_dir: Path) -> None:
    labels = (np.arange(50) % 2).astype(np.int64)
    np.savez(data_dir / "flat.npz", x=np.zeros((50, 4), np.float32), y=labels)
    spec = spirals_job()
    spec["dataset"] = {"kind": "npz", "path": "flat.npz"}
    spec["model"] = {"kind": "resnet"}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["error"]["location"][:2] == ["body", "model"]


def test_yaml_and_malformed_bodies(client: httpx.Client) -> None:
    yaml_spec = (
        "model: {kind: mlp, hidden: [4]}\n"
        "dataset: {kind: moons, samples: 100}\n"
        "training: {epochs: 1}\n"
    )
    response = client.post("/jobs", content=yaml_spec, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 202, response.text
    bad = client.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error"]["location"] == ["body"]
    assert httpx.post(f"{client.base_url}/jobs", json=spirals_job()).status_code == 401
    wait_for(client, response.json()["job_id"], lambda v: v["status"] == "SUCCEEDED")


def test_unknown_jobs_are_404(client: httpx.Client) -> None:
    for method, path in [
        ("GET", "/jobs/nope"),
        ("POST", "/jobs/nope/stop"),
        ("GET", "/jobs/nope/logs"),
        ("GET", "/jobs/nope/checkpoint"),
        ("GET", "/jobs/nope/events"),
        ("DELETE", "/jobs/nope"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["type"] == "unknown_job"
    assert client.get("/jobs/bad id!").status_code == 422


def test_a_job_that_fails_while_training_ends_failed_and_the_worker_lives_on(
    client: httpx.Client, data_dir: Path
) -> None:
    # Labels 0..2 in the file, but a NaN feature makes the loss NaN: training itself still runs;
    # so break it harder: a file that disappears after the job was accepted.
    path = data_dir / "vanishing.npz"
    np.savez(
        path,
        x=np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32),
        y=(np.arange(200) % 2).astype(np.int64),
    )
    spec = spirals_job()
    spec["dataset"] = {"kind": "npz", "path": "vanishing.npz"}
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    path.unlink()
    view = wait_for(client, job_id, lambda v: v["status"] in ("FAILED", "SUCCEEDED"))
    assert view["status"] == "FAILED" and "vanishing.npz" in view["error"]
    assert "Traceback" in client.get(f"/jobs/{job_id}/logs").text
    healthy = client.post("/jobs", json=spirals_job(training={"epochs": 1})).json()["job_id"]
    assert (
        wait_for(client, healthy, lambda v: v["status"] in ("SUCCEEDED", "FAILED"))["status"]
        == "SUCCEEDED"
    )


def test_a_killed_worker_s_job_is_resumed_from_its_checkpoint_and_trains_each_epoch_once(
    tolaria_factory, tolaria: ServiceProcess, client: httpx.Client
) -> None:
    spare = tolaria_factory()  # a second replica: both consume the queue
    replicas = {p.env["TOLARIA_INSTANCE"]: p for p in (tolaria, spare)}
    # Long enough that the orphaned job process cannot finish on its own before it notices that
    # its worker is gone (it looks every TOLARIA_STOP_POLL_S, 0.2 s): at 8 epochs of ~70 ms a
    # fresh-clone run once saw it finish first, SUCCEEDED at attempt 1, with nothing to resume.
    spec = spirals_job(training={"epochs": 30, "batch_size": 8})
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    view = wait_for(
        client, job_id, lambda v: v["status"] == "RUNNING" and v["progress"]["epoch"] >= 2
    )
    victim = replicas[view["worker"]]
    victim.kill()  # SIGKILL: the replica running the job (its API and its worker) dies at once
    survivor = next(p for p in replicas.values() if p is not victim)
    with httpx.Client(base_url=survivor.url, timeout=60) as watch:
        final = wait_for(watch, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 240)
        assert final["status"] == "SUCCEEDED", final
        assert (
            final["attempt"] == view["attempt"] + 1
            and final["worker"] == survivor.env["TOLARIA_INSTANCE"]
        )
        logs = watch.get(f"/jobs/{job_id}/logs").text
        state = torch.load(
            io.BytesIO(watch.get(f"/jobs/{job_id}/checkpoint").content), weights_only=True
        )
    victim.restart()  # the module's later tests use it again
    assert "resumed from the checkpoint of epoch" in logs
    assert [entry["epoch"] for entry in state["history"]] == list(range(30))  # each epoch once
    finished = [
        line.split("tolaria.job: epoch ")[1].split("/")[0]
        for line in logs.splitlines()
        if "tolaria.job: epoch " in line
    ]
    assert len(finished) == len(set(finished)), finished  # no epoch reported done twice

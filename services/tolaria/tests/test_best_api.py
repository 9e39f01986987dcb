"""Through a real Tolaria, Redis and Urza: a job grown on a fixed schedule (no controller asked,
blueprints compiled by Urza), its best epoch's weights downloaded with `?which=best`, the model's
cost in its metrics, and the 422s of a schedule the job could not execute."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from jobhelpers import spirals_job, wait_for

import esper
from esper.contracts.jobs import JobSpec
from esper.kernels import tiered_cache
from esper.testing import RedisServer, ServiceProcess
from tolaria.datasets import load_dataset
from tolaria.models import build_model, morphable_layers

HOST_PARAMETERS = (2 * 8 + 8) + (8 * 8 + 8) + (8 * 2 + 2)
"""The spirals MLP 2 → 8 → 8 → 2."""


def scheduled(**training: Any) -> dict[str, Any]:
    return spirals_job(
        training={"epochs": 4, "lr": 0.1, **training},
        morphogenesis={
            "controller": "schedule",
            "schedule": [{"epoch": 0, "layer": "2", "blueprint": "residual_mlp"}],
            "ramp_steps": 10,
        },
    )


def accuracy_of(
    blob: bytes, stack_redis: RedisServer, urza: ServiceProcess, data_dir: Path
) -> tuple[float, dict[str, Any]]:
    state = torch.load(io.BytesIO(blob), weights_only=True)
    spec = JobSpec.model_validate(state["spec"])
    data = load_dataset(spec.dataset, data_dir)
    model = build_model(spec.model, data.input_shape, data.classes)
    morphable = esper.wrap(
        model,
        seeds_per_layer=state["seeds_per_layer"],
        layers=morphable_layers(model, spec.morphogenesis),
        kernels=tiered_cache(redis_url=stack_redis.url, urza_url=urza.url),
    )
    morphable.load_state_dict(state["model"])
    morphable.eval()
    with torch.no_grad():
        accuracy = (morphable(data.test_x).argmax(1) == data.test_y).float().mean().item()
    return accuracy, state


def test_a_scheduled_job_grows_and_keeps_its_best_epoch(
    client: httpx.Client, stack_redis: RedisServer, urza: ServiceProcess, data_dir: Path
) -> None:
    response = client.post("/jobs", json=scheduled())
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 180)
    assert view["status"] == "SUCCEEDED", view
    metrics = view["metrics"]
    assert [(s["layer"], s["blueprint"]) for s in view["seeds"]] == [("2", "residual_mlp")]
    assert metrics["parameters"] > HOST_PARAMETERS
    assert metrics["train_flops"] > 0
    assert metrics["best_epoch"] is not None and metrics["best_test_accuracy"] is not None

    best = client.get(f"/jobs/{job_id}/checkpoint", params={"which": "best"})
    assert best.status_code == 200, best.text
    accuracy, state = accuracy_of(best.content, stack_redis, urza, data_dir)
    assert state["epoch"] == metrics["best_epoch"]
    assert state["val_accuracy"] == metrics["best_val_accuracy"]
    assert abs(accuracy - metrics["best_test_accuracy"]) < 1e-6

    last = client.get(f"/jobs/{job_id}/checkpoint")
    assert last.status_code == 200
    accuracy, state = accuracy_of(last.content, stack_redis, urza, data_dir)
    assert state["epoch"] == 4 and abs(accuracy - metrics["test_accuracy"]) < 1e-6

    logs = client.get(f"/jobs/{job_id}/logs").text
    assert f"best epoch {metrics['best_epoch'] + 1}/4: val acc" in logs
    assert "decision_point_missed" not in logs and "passed without decisions" not in logs

    bogus = client.get(f"/jobs/{job_id}/checkpoint", params={"which": "first"})
    assert bogus.status_code == 422, bogus.text
    assert bogus.json()["error"]["location"][-1] == "which"


def test_without_keep_best_there_is_no_best_checkpoint(client: httpx.Client) -> None:
    spec = spirals_job(training={"epochs": 1, "keep_best": False})
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"))
    assert view["status"] == "SUCCEEDED", view
    assert view["metrics"]["best_epoch"] == 0 and view["metrics"]["best_test_accuracy"] is None
    missing = client.get(f"/jobs/{job_id}/checkpoint", params={"which": "best"})
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["type"] == "no_checkpoint"
    assert client.get(f"/jobs/{job_id}/checkpoint").status_code == 200


@pytest.mark.parametrize(
    ("morphogenesis", "location", "words"),
    [
        (
            {
                "controller": "schedule",
                "schedule": [{"epoch": 0, "layer": "9", "blueprint": "residual_mlp"}],
            },
            ["body", "morphogenesis", "schedule", 0, "layer"],
            "not a wrapped layer",
        ),
        (
            {
                "controller": "schedule",
                "schedule": [
                    {"epoch": 0, "layer": "2", "blueprint": "residual_mlp"},
                    {"epoch": 3, "layer": "2", "blueprint": "residual_mlp"},
                ],
            },
            ["body", "morphogenesis", "schedule", 1, "epoch"],
            "training.epochs 3",
        ),
        (
            {"schedule": [{"epoch": 0, "layer": "2", "blueprint": "residual_mlp"}]},
            ["body", "morphogenesis", "schedule"],
            "controller: schedule",
        ),
    ],
)
def test_a_schedule_the_job_could_not_execute_is_refused(
    client: httpx.Client, morphogenesis: dict[str, Any], location: list[Any], words: str
) -> None:
    before = client.get("/jobs").json()["items"]
    response = client.post("/jobs", json=spirals_job(morphogenesis=morphogenesis))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["location"] == location, error
    assert words in error["message"]
    assert client.get("/jobs").json()["items"] == before

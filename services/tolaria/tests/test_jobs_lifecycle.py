"""Jobs through a real Tolaria (API + worker processes), real Redis and real Urza: submit → run →
succeed with a checkpoint that loads back into esper.wrap; control decisions germinate seeds;
stop; idempotent submit; nothing lost when the API restarts."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import httpx
import redis
import torch
from jobhelpers import spirals_job, wait_for

import esper
from esper.contracts import ControlDecision, Envelope
from esper.contracts.jobs import JobSpec
from esper.kernels import tiered_cache
from esper.testing import RedisServer, ServiceProcess
from tolaria.datasets import load_dataset
from tolaria.models import build_model, morphable_layers


def events_of(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a finished job, read through the SSE route."""
    events = []
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind != "end":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_a_job_runs_to_success_and_its_checkpoint_loads_into_esper_wrap(
    client: httpx.Client, stack_redis: RedisServer, urza: ServiceProcess, data_dir
) -> None:
    response = client.post("/jobs", json=spirals_job())
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["status"] == "PENDING"
    wait_for(client, job_id, lambda v: v["status"] in ("RUNNING", "SUCCEEDED"))
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"))
    assert view["status"] == "SUCCEEDED", view
    assert view["progress"]["epoch"] == 3 and view["progress"]["fraction"] == 1.0
    assert (
        view["metrics"]["val_accuracy"] is not None and view["metrics"]["test_accuracy"] is not None
    )
    assert view["started_at"] <= view["finished_at"] and view["has_checkpoint"]

    blob = client.get(f"/jobs/{job_id}/checkpoint")
    assert blob.status_code == 200
    state = torch.load(io.BytesIO(blob.content), weights_only=True)
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
    with torch.no_grad():
        accuracy = (morphable(data.test_x).argmax(1) == data.test_y).float().mean().item()
    assert abs(accuracy - view["metrics"]["test_accuracy"]) < 1e-6

    kinds = [e["type"] for e in events_of(client, job_id)]
    assert kinds.count("telemetry.report") == 3  # one epoch report per epoch
    assert kinds[0] == "event.job_status" and kinds[-1] == "event.job_status"
    assert "epoch 3/3" in client.get(f"/jobs/{job_id}/logs").text


def test_a_decision_on_the_control_topic_germinates_a_seed_that_trains(
    client: httpx.Client, stack_redis: RedisServer, prefix: str, urza: ServiceProcess
) -> None:
    spec = spirals_job(
        training={"epochs": 6}, morphogenesis={"ramp_steps": 10, "publish_kernels": True}
    )
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    wait_for(client, job_id, lambda v: v["status"] == "RUNNING")
    bus = redis.Redis.from_url(stack_redis.url)

    def decide(**fields: object) -> str:
        decision = ControlDecision(
            decision_id=f"dec-{uuid.uuid4().hex[:8]}", job_id=job_id, reason="test", **fields
        )
        bus.xadd(f"{prefix}:control", {"envelope": Envelope.wrap(decision, source="test").encode()})
        return decision.decision_id

    good = decide(action="germinate", layer="2", blueprint="wide_mlp", alpha=1.0, ramp_steps=10)
    bad = decide(action="germinate", layer="no_such_layer", blueprint="wide_mlp")
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 180)
    assert view["status"] == "SUCCEEDED", view
    seeds = view["seeds"]
    assert [(s["layer"], s["state"], s["blueprint"]) for s in seeds] == [
        ("2", "ACTIVE", "wide_mlp")
    ]
    assert seeds[0]["alpha"] == 1.0 and seeds[0]["contribution"] is not None

    events = events_of(client, job_id)
    taken = {
        e["payload"]["decision_id"]: e["payload"]
        for e in events
        if e["type"] == "event.decision_taken"
    }
    assert taken[good]["outcome"] == "applied"
    assert taken[bad]["outcome"] == "refused" and "no_such_layer" in taken[bad]["reason"]
    assert taken[bad]["code"] == "unknown_layer" and taken[good]["code"] is None
    states = [e["payload"]["to_state"] for e in events if e["type"] == "event.seed_transition"]
    assert states[:3] == ["ALLOCATED", "LOADING", "ACTIVE"]
    reported = [s for e in events if e["type"] == "telemetry.report" for s in e["payload"]["seeds"]]
    assert reported and reported[-1]["state"] == "ACTIVE"

    # It trained: its weights moved away from the kernel Urza compiled (whose last layer is 0),
    # and the trained kernel was published back to Urza with its lineage.
    state = torch.load(
        io.BytesIO(client.get(f"/jobs/{job_id}/checkpoint").content), weights_only=True
    )
    trained = {k: v for k, v in state["model"].items() if ".seeds.0." in k}
    fresh = tiered_cache(redis_url=stack_redis.url, urza_url=urza.url)
    template = asyncio.run(fresh.get(seeds[0]["kernel_id"])).template.state_dict()
    assert trained and len(trained) == len(template)
    assert any(not torch.equal(t, template[k.split(".seeds.0.", 1)[1]]) for k, t in trained.items())
    published = httpx.get(f"{urza.url}/kernels", params={"blueprint": "wide_mlp"}).json()["items"]
    mine = [k for k in published if k["lineage"].get("job_id") == job_id]
    assert len(mine) == 1 and mine[0]["lineage"]["parent_kernel_id"] == seeds[0]["kernel_id"]
    assert mine[0]["lineage"]["layer"] == "2" and mine[0]["lineage"]["seed"] == 0


def test_stop_ends_a_running_job_and_a_queued_one(client: httpx.Client) -> None:
    long = client.post("/jobs", json=spirals_job(training={"epochs": 500})).json()["job_id"]
    queued = client.post("/jobs", json=spirals_job(training={"epochs": 500})).json()["job_id"]
    wait_for(client, long, lambda v: v["status"] == "RUNNING" and v["progress"]["step"] > 0)
    stopped = client.post(f"/jobs/{queued}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED"
    assert client.post(f"/jobs/{long}/stop").json()["stop_requested"] is True
    view = wait_for(client, long, lambda v: v["status"] != "RUNNING", 30)
    assert view["status"] == "STOPPED" and view["progress"]["epoch"] < 500
    assert client.delete(f"/jobs/{long}").status_code == 204
    assert client.get(f"/jobs/{long}").status_code == 404


def test_submitting_a_submission_id_again_returns_the_same_job(client: httpx.Client) -> None:
    spec = spirals_job(submission_id=f"sub-{uuid.uuid4().hex[:8]}", training={"epochs": 1})
    first = client.post("/jobs", json=spec)
    again = client.post("/jobs", json=spec)
    assert first.status_code == 202 and first.json()["created"] is True
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["job_id"] == first.json()["job_id"]
    listed = client.get("/jobs", params={"limit": 1000}).json()["items"]
    assert [j["job_id"] for j in listed].count(first.json()["job_id"]) == 1
    wait_for(client, first.json()["job_id"], lambda v: v["status"] == "SUCCEEDED")


def test_restarting_the_api_loses_no_job(client: httpx.Client, tolaria: ServiceProcess) -> None:
    jobs = [
        client.post("/jobs", json=spirals_job(training={"epochs": 1})).json()["job_id"]
        for _ in range(2)
    ]
    tolaria.restart()
    for job_id in jobs:
        view = wait_for(client, job_id, lambda v: v["status"] == "SUCCEEDED", 180)
        assert view["progress"]["epoch"] == 1


def test_a_job_without_morphogenesis_trains_the_plain_model_and_refuses_decisions(
    client: httpx.Client, stack_redis: RedisServer, prefix: str
) -> None:
    spec = spirals_job(training={"epochs": 20, "batch_size": 8}, morphogenesis={"enabled": False})
    job_id = client.post("/jobs", json=spec).json()["job_id"]
    wait_for(client, job_id, lambda v: v["status"] == "RUNNING")
    decision = ControlDecision(
        decision_id="dec-off",
        job_id=job_id,
        action="germinate",
        layer="2",
        blueprint="wide_mlp",
        reason="test",
    )
    bus = redis.Redis.from_url(stack_redis.url)
    bus.xadd(f"{prefix}:control", {"envelope": Envelope.wrap(decision, source="test").encode()})
    view = wait_for(client, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"))
    assert view["status"] == "SUCCEEDED" and view["seeds"] == []
    events = events_of(client, job_id)
    assert [e["type"] for e in events].count("telemetry.report") == 20
    refusals = [e["payload"] for e in events if e["type"] == "event.decision_taken"]
    assert [r["outcome"] for r in refusals] == ["refused"]
    assert "morphogenesis is off" in refusals[0]["reason"]
    assert refusals[0]["code"] == "morphogenesis_off"

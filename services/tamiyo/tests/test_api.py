"""Tamiyo's REST API over real HTTP, on a Tamiyo process fed through a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from tamiyo_helpers import on_the_wire, report, seed

from esper.bus import FIELD
from esper.contracts import ControlDecision, Envelope, Message
from esper.testing import RedisServer, ServiceProcess

Send = Callable[[Message], Envelope]


@pytest.fixture(scope="module")
def bus(module_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(module_redis.url)
    yield client
    client.close()


@pytest.fixture
def send(bus: redis.Redis, bus_prefix: str, tamiyo: ServiceProcess) -> Send:
    """Publish a message on its topic the way a producer does (one `envelope` field)."""

    def publish(message: Message) -> Envelope:
        envelope = Envelope.wrap(on_the_wire(message), source="tolaria")
        bus.xadd(f"{bus_prefix}:{envelope.topic}", {FIELD: envelope.encode()})
        return envelope

    return publish


def wait(
    client: httpx.Client, path: str, done: Callable[[Any], bool], timeout_s: float = 10
) -> Any:
    deadline = time.monotonic() + timeout_s
    body: Any = None
    while time.monotonic() < deadline:
        response = client.get(path)
        body = response.json()
        if response.status_code == 200 and done(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"GET {path}: not there in {timeout_s} s: {body}")


def known_job(client: httpx.Client, send: Send, job_id: str, epochs: int = 1, **kw: Any) -> Any:
    for epoch in range(epochs):
        send(report(job_id, epoch, 0.5 - 0.1 * epoch, **kw))  # improving: no plateau
    return wait(client, f"/jobs/{job_id}/controller", lambda s: s["last_epoch"] == epochs - 1)


def error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["type"] == kind, body
    return body


# ------------------------------------------------------------------------ policy
def test_policy_defaults_come_from_the_environment(client: httpx.Client) -> None:
    body = client.get("/policy").json()
    assert body["source"] in ("defaults", "stored")
    if body["source"] == "defaults":
        assert body["policy"]["warmup_epochs"] == 1 and body["policy"]["patience"] == 2
        assert body["policy"]["train_stall_delta"] == 0.02
        assert body["policy"]["strategy"] == "diversify"


@pytest.mark.parametrize(
    "change, where",
    [
        ({"patience": -1}, "patience"),
        ({"max_seeds_per_job": -1}, "max_seeds_per_job"),
        ({"keep_threshold": 2}, "keep_threshold"),
        ({"overfit_patience": 0}, "overfit_patience"),
        ({"train_stall_epochs": 65}, "train_stall_epochs"),
        ({"train_stall_delta": -0.1}, "train_stall_delta"),
        ({"max_unpaid_germinations": 0}, "max_unpaid_germinations"),
        ({"rejudge_epochs": 0}, "rejudge_epochs"),
        ({"blueprints": ["wide_mlp", "wide_mlp"]}, "blueprints"),
        ({"strategy": "random"}, "strategy"),
        ({"retire_everything": True}, "retire_everything"),
    ],
)
def test_impossible_policies_are_refused_with_422(
    client: httpx.Client, change: dict[str, Any], where: str
) -> None:
    before = client.get("/policy").json()
    body = error(
        client.put("/policy", json={**before["policy"], **change}), 422, "validation_error"
    )
    assert body["location"][:2] == ["body", where]
    assert client.get("/policy").json() == before


def test_a_policy_naming_a_blueprint_urza_lacks_is_refused(client: httpx.Client) -> None:
    before = client.get("/policy").json()
    wanted = {**before["policy"], "blueprints": ["bottleneck", "no_such_blueprint"]}
    body = error(client.put("/policy", json=wanted), 422, "unknown_blueprint")
    assert body["location"] == ["body", "blueprints", 1]
    assert client.get("/policy").json() == before


def test_a_policy_put_is_shared_and_validated(client: httpx.Client) -> None:
    before = client.get("/policy").json()["policy"]
    error(httpx.put(f"{client.base_url}/policy", json=before), 401, "unauthorized")
    wanted = {**before, "patience": 5, "strategy": "ensemble", "blueprints": ["bottleneck"]}
    put = client.put("/policy", json=wanted)
    assert put.status_code == 200 and put.json()["source"] == "stored"
    assert client.get("/policy").json()["policy"] == wanted
    assert client.put("/policy", json=before).status_code == 200


# ------------------------------------------------------------------ jobs, decisions
def test_controller_state_of_an_unknown_job_is_404(client: httpx.Client) -> None:
    error(client.get("/jobs/job-nobody/controller"), 404, "unknown_job")
    error(client.get("/jobs/bad%20id/controller"), 422, "validation_error")


def test_a_plateau_is_decided_recorded_and_listed_by_job(
    client: httpx.Client, send: Send, bus: redis.Redis, bus_prefix: str
) -> None:
    for epoch in range(4):
        send(report("job-api-1", epoch, 0.69))
    send(report("job-api-other", 0, 0.69))
    page = wait(client, "/decisions?job_id=job-api-1", lambda b: len(b["items"]) == 1)
    [record] = page["items"]
    assert record["source"] == "tamiyo" and record["policy"] == "heuristic"
    assert record["decision"]["action"] == "germinate" and record["outcome"] == "published"
    decision = ControlDecision.model_validate(record["decision"])
    on_stream = [
        Envelope.decode(fields[FIELD]).message()
        for _, fields in bus.xrange(f"{bus_prefix}:control")
    ]
    assert decision in on_stream
    state = client.get("/jobs/job-api-1/controller").json()
    assert state["pending"]["decision_id"] == decision.decision_id
    one = client.get(f"/decisions/{decision.decision_id}").json()
    assert one == record
    error(client.get("/decisions/tmy-none"), 404, "unknown_decision")
    assert all(r["decision"]["job_id"] == "job-api-1" for r in page["items"])


def test_decisions_page_newest_first(client: httpx.Client, send: Send) -> None:
    for job in ("job-page-1", "job-page-2"):
        for epoch in range(4):
            send(report(job, epoch, 0.69))
        wait(client, f"/decisions?job_id={job}", lambda b: len(b["items"]) == 1)
    first = client.get("/decisions", params={"limit": 1}).json()
    assert first["items"][0]["decision"]["job_id"] == "job-page-2"
    second = client.get("/decisions", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["decision"]["job_id"] == "job-page-1"
    error(client.get("/decisions", params={"limit": 0}), 422, "validation_error")
    error(client.get("/decisions", params={"cursor": "x"}), 422, "validation_error")


# ---------------------------------------------------------------------- operators
def post(client: httpx.Client, job_id: str, **body: Any) -> httpx.Response:
    return client.post(f"/jobs/{job_id}/decisions", json=body)


def test_manual_decisions_are_checked_against_what_tamiyo_knows(
    client: httpx.Client, send: Send
) -> None:
    known_job(client, send, "job-op-1")
    germinate = {"action": "germinate", "layer": "0", "blueprint": "bottleneck"}
    error(post(client, "job-op-none", **germinate), 404, "unknown_job")
    body = error(post(client, "job-op-1", **{**germinate, "layer": "7"}), 422, "unknown_layer")
    assert body["location"] == ["body", "layer"]
    body = error(post(client, "job-op-1", action="germinate", layer="0"), 422, "invalid_decision")
    assert "blueprint or a kernel" in body["message"]
    error(
        post(client, "job-op-1", **{**germinate, "blueprint": "no_such"}), 422, "unknown_blueprint"
    )
    error(post(client, "job-op-1", **{**germinate, "colour": "red"}), 422, "validation_error")
    error(post(client, "job-op-1", action="retire", layer="0", seed=0), 422, "seed_not_active")
    body = error(post(client, "job-op-1", action="retire", layer="0"), 422, "invalid_decision")
    assert "needs a seed" in body["message"]
    unauthorized = httpx.post(f"{client.base_url}/jobs/job-op-1/decisions", json=germinate)
    error(unauthorized, 401, "unauthorized")
    assert client.get("/decisions", params={"job_id": "job-op-1"}).json()["items"] == []


def test_a_manual_germination_is_published_like_tamiyos_own(
    client: httpx.Client, send: Send, bus: redis.Redis, bus_prefix: str
) -> None:
    known_job(client, send, "job-op-2")
    body = {
        "decision_id": "op-grow-1",
        "action": "germinate",
        "layer": "0",
        "blueprint": "bottleneck",
        "ramp_steps": 10,
        "reason": "operator: try a bottleneck",
    }
    created = post(client, "job-op-2", **body)
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["source"] == "operator" and record["decision"]["job_id"] == "job-op-2"
    again = post(client, "job-op-2", **body)
    assert again.status_code == 200 and again.json() == record
    error(post(client, "job-op-2", **{**body, "layer": "2"}), 409, "conflict")
    # one germination in flight per job, for operators too
    error(
        post(client, "job-op-2", **{**body, "decision_id": "op-grow-2"}),
        409,
        "germination_in_flight",
    )
    entries = bus.xrange(f"{bus_prefix}:control")
    mine = [Envelope.decode(f[FIELD]) for _, f in entries]
    mine = [e for e in mine if e.payload["decision_id"] == "op-grow-1"]
    assert len(mine) == 1 and mine[0].source == "tamiyo"
    state = client.get("/jobs/job-op-2/controller").json()
    assert state["pending"]["origin"] == "operator"


def test_a_manual_retire_of_an_active_seed(client: httpx.Client, send: Send) -> None:
    known_job(client, send, "job-op-3", epochs=2, seeds=[seed("2", 1, contribution=0.0)])
    created = post(client, "job-op-3", action="retire", layer="2", seed=1, ramp_steps=5)
    assert created.status_code == 201, created.text
    decision = created.json()["decision"]
    assert decision["decision_id"].startswith("op-") and decision["ramp_steps"] == 5
    state = client.get("/jobs/job-op-3/controller").json()
    assert state["seeds"][0]["verdict"] == "retire" and state["cooldown_until"] is not None


# ------------------------------------------------------------------------ service
def test_ready_and_measured(client: httpx.Client) -> None:
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["consumer"] is True
    metrics = client.get("/metrics").text
    assert "esper_tamiyo_decisions_total" in metrics
    assert "esper_tamiyo_decision_latency_seconds_bucket" in metrics

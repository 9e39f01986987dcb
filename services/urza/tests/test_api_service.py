"""Urza as a service, on a real Urza and Redis: probes, heartbeats, request metrics, a Redis outage,
and durability across a graceful stop and a crash (SIGKILL) of the process.

The tests in this module run in file order and share one Urza: the outage and restart tests are
last, and each leaves Redis and Urza running again.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from esper.contracts import Envelope, KernelMeta, KernelResult
from esper.contracts.api import ErrorBody, HealthStatus, Readiness
from esper.testing import RedisServer, ServiceProcess

DEADLINE_S = 15.0


def poll(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """`check()` until it returns something truthy (returned), or fail after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.05)


def stream(bus: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of a stream (the bus writes one field, `envelope`)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], bus.xrange(key))


def envelopes(bus: redis.Redis, topic: str, type_: str) -> list[Envelope]:
    found = []
    for _entry_id, fields in stream(bus, f"esper:{topic}"):
        envelope = Envelope.decode(fields[b"envelope"])
        if envelope.type == type_:
            found.append(envelope)
    return found


def announced(bus: redis.Redis, kernel_id: str) -> int:
    return sum(
        e.payload["kernel_id"] == kernel_id for e in envelopes(bus, "events", "event.kernel_ready")
    )


def request_counts(client: httpx.Client) -> dict[tuple[str, str, str], float]:
    """`esper_http_requests_total` by (method, route, status)."""
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "esper_http_requests_total":
                assert sample.labels["service"] == "urza"
                key = (sample.labels["method"], sample.labels["route"], sample.labels["status"])
                counts[key] = sample.value
    return counts


def compile_new(client: httpx.Client, in_features: int, **extra: Any) -> KernelResult:
    body = {
        "blueprint": "low_rank",
        "host": {"kind": "linear", "in_features": in_features, "out_features": 8},
        "format": "torchscript",
        **extra,
    }
    resp = client.post("/kernels/compile", json=body)
    assert resp.status_code == 201, resp.text
    return KernelResult.model_validate(resp.json())


def readiness(client: httpx.Client) -> tuple[int, Readiness]:
    resp = client.get("/readyz")
    return resp.status_code, Readiness.model_validate(resp.json())


# -------------------------------------------------------------------------------------- probes
def test_healthz(anon: httpx.Client) -> None:
    resp = anon.get("/healthz")
    assert resp.status_code == 200
    health = HealthStatus.model_validate(resp.json())
    assert (health.status, health.service) == ("ok", "urza")


def test_readyz(anon: httpx.Client) -> None:
    status, ready = readiness(anon)
    assert status == 200
    assert (ready.status, ready.service) == ("ready", "urza")
    assert ready.checks["redis"] is True


def test_unknown_route_is_an_error_body(anon: httpx.Client) -> None:
    resp = anon.get("/no/such/route")
    assert resp.status_code == 404
    error = ErrorBody.model_validate(resp.json()).error
    assert error.type == "not_found"
    assert "/no/such/route" in error.message


def test_heartbeats_on_the_health_stream(urza: ServiceProcess, bus: redis.Redis) -> None:
    def beats() -> list[Envelope]:
        found = [
            e
            for e in envelopes(bus, "health", "health.heartbeat")
            if e.payload["instance"] == urza.env["URZA_INSTANCE"]
        ]
        return found if len(found) >= 3 else []

    found = poll(beats, "three heartbeats")
    for beat in found:
        assert beat.source == "urza"
        assert beat.payload["service"] == "urza"
        assert beat.payload["interval_s"] == float(urza.env["URZA_HEARTBEAT_INTERVAL_S"])
    latest = found[-1].payload
    assert latest["status"] == "ok"
    assert latest["details"]["redis"] is True


def test_metrics_name_route_templates_never_raw_ids(api: httpx.Client, anon: httpx.Client) -> None:
    kernel = compile_new(api, 19).kernel
    before = request_counts(anon)
    assert anon.get(f"/kernels/{kernel.kernel_id}").status_code == 200
    assert anon.get(f"/kernels/{kernel.kernel_id}/artifact").status_code == 200
    assert anon.get("/kernels/no-such-tag").status_code == 404
    assert anon.get("/blueprints/conv3x3").status_code == 200

    text = anon.get("/metrics").text
    after = request_counts(anon)
    expected = {
        ("GET", "/kernels/{ref}", "200"): 1,
        ("GET", "/kernels/{ref}", "404"): 1,
        ("GET", "/kernels/{kernel_id}/artifact", "200"): 1,
        ("GET", "/blueprints/{name}", "200"): 1,
    }
    for key, grew in expected.items():
        assert after.get(key, 0) - before.get(key, 0) == grew, key
    assert kernel.kernel_id not in text
    assert "no-such-tag" not in text
    assert "conv3x3" not in text
    assert "esper_urza_compile_duration_seconds_bucket" in text
    assert "esper_urza_compile_queue_depth" in text


# -------------------------------------------------------------------------------- Redis outage
def test_redis_outage_makes_urza_not_ready_but_still_serving(
    redis_module: RedisServer, api: httpx.Client, anon: httpx.Client
) -> None:
    redis_module.stop()
    try:

        def not_ready() -> Readiness | None:
            status, ready = readiness(anon)
            return ready if status == 503 else None

        ready = poll(not_ready, "/readyz to answer 503")
        assert ready.status == "not_ready"
        assert isinstance(ready.checks["redis"], str)
        assert "redis" in ready.checks["redis"].lower()
        assert anon.get("/healthz").status_code == 200  # alive, only not ready

        # The registry does not need Redis: a compile during the outage is stored and served.
        outage = compile_new(api, 11)
        assert anon.get(f"/kernels/{outage.kernel.kernel_id}/artifact").status_code == 200
    finally:
        redis_module.restart()

    poll(lambda: readiness(anon)[0] == 200, "/readyz to answer 200 again")
    status, ready = readiness(anon)
    assert (status, ready.status, ready.checks["redis"]) == (200, "ready", True)
    # The announcement was retried until Redis came back (within ESPER_BUS_RETRY_TIMEOUT_S).
    with redis.Redis.from_url(redis_module.url) as fresh:
        poll(lambda: announced(fresh, outage.kernel.kernel_id) == 1, "the outage kernel's event")
        # Heartbeats resume on the new (empty) server.
        poll(
            lambda: [
                e
                for e in envelopes(fresh, "health", "health.heartbeat")
                if e.payload["status"] == "ok" and e.payload["details"]["redis"] is True
            ],
            "a heartbeat after the outage",
        )


# ------------------------------------------------------------------------------ restarts
def test_everything_survives_a_graceful_restart(
    urza: ServiceProcess,
    api: httpx.Client,
    anon: httpx.Client,
    token: str,
    admin_token: str,
) -> None:
    spec = anon.get("/blueprints/low_rank").json()["spec"]
    spec.update(name="durable_blueprint", params={"rank": 3})
    registered = api.post("/blueprints", json=spec)
    assert registered.status_code == 201, registered.text
    compiled = compile_new(api, 13, tags=["durable-tag"]).kernel
    data = anon.get(f"/kernels/{compiled.kernel_id}/artifact").content
    meta = {
        "name": "durable_upload",
        "format": compiled.format,
        "host": compiled.host.model_dump(mode="json"),
        "lineage": {"parent_kernel_id": compiled.kernel_id, "job_id": "job-durable"},
    }
    upload = api.post(
        "/kernels",
        data={"meta": json.dumps(meta)},
        files={"artifact": ("k", data)},
        headers={"X-Esper-Admin-Token": admin_token},  # TorchScript: an admin's upload
    )
    assert upload.status_code == 201, upload.text
    uploaded = KernelResult.model_validate(upload.json()).kernel
    listing = anon.get("/kernels", params={"limit": 1000}).json()
    blueprints = anon.get("/blueprints").json()
    pid = urza.pid

    urza.restart()  # SIGTERM, then the same command on the same port and data directory
    assert urza.pid != pid

    with httpx.Client(base_url=urza.url, timeout=60.0) as after:
        assert after.get("/kernels", params={"limit": 1000}).json() == listing
        assert after.get("/blueprints").json() == blueprints
        assert after.get("/blueprints/durable_blueprint").json() == registered.json()
        assert after.get("/kernels/durable-tag").json()["kernel_id"] == compiled.kernel_id
        assert KernelMeta.model_validate(after.get(f"/kernels/{uploaded.kernel_id}").json()) == (
            uploaded
        )
        for kernel in (compiled, uploaded):
            artifact = after.get(f"/kernels/{kernel.kernel_id}/artifact")
            assert artifact.status_code == 200
            assert artifact.content == data
            meta_header = base64.urlsafe_b64decode(artifact.headers["x-esper-kernel-meta"])
            assert KernelMeta.model_validate_json(meta_header) == kernel
        # The same compile input is still found, not compiled again.
        again = after.post(
            "/kernels/compile",
            json={
                "blueprint": "low_rank",
                "host": compiled.host.model_dump(mode="json"),
                "format": "torchscript",
            },
            headers={"Authorization": f"Bearer {token}"},
        )
        assert again.status_code == 200, again.text
        assert KernelResult.model_validate(again.json()).kernel == compiled


def test_a_kernel_acknowledged_before_a_crash_is_still_there(
    urza: ServiceProcess, api: httpx.Client
) -> None:
    kernel = compile_new(api, 17).kernel
    urza.kill()  # SIGKILL right after the 201: no shutdown code runs
    urza.start()
    with httpx.Client(base_url=urza.url, timeout=60.0) as after:
        got = after.get(f"/kernels/{kernel.kernel_id}")
        assert got.status_code == 200, got.text
        assert KernelMeta.model_validate(got.json()) == kernel
        artifact = after.get(f"/kernels/{kernel.kernel_id}/artifact")
        assert artifact.status_code == 200
        assert artifact.headers["x-esper-digest"] == kernel.digest
        assert after.get("/readyz").status_code == 200

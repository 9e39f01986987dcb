"""The service kit against real things: uvicorn on a real socket, a real redis-server, real
processes. The app under test is `kit_demo_service.build_app` (a GET, a token-guarded POST with a
pydantic body, raw-body uploads, an ApiError route, a crashing route, a flippable readiness check).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from esper.bus import BusSettings
from esper.contracts import Envelope
from esper.contracts.api import ErrorBody, HealthStatus, Readiness
from esper.contracts.health import Heartbeat
from esper.service import JsonFormatter
from esper.testing import RedisServer, ServiceProcess, ServiceStartError, free_port

TESTS_DIR = Path(__file__).parent
# Under --import-mode=importlib the tests dir is not on sys.path; the demo service lives there.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
from kit_demo_service import (  # noqa: E402
    CRASH_MESSAGE,
    SERVICE,
    VERSION,
    KitSettings,
    Probe,
    build_app,
)

T = TypeVar("T")
MAX_BODY = 4096
BIG_LIMIT = 64 * 1024


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 5.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def error_of(response: httpx.Response) -> ErrorBody:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return ErrorBody.model_validate(response.json())


# --- an app on a real socket ----------------------------------------------------------------


@dataclass
class Running:
    app: FastAPI
    probe: Probe
    settings: KitSettings
    server: uvicorn.Server
    thread: threading.Thread
    client: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "uvicorn did not shut down"


def run_in_thread(app: FastAPI, settings: KitSettings) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{settings.port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited while starting (see the log)"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    return server, thread


@pytest.fixture
def start_app(bus_settings: BusSettings) -> Iterator[Callable[..., Running]]:
    """`start_app(**settings)`: the demo app under uvicorn on a free port, on the test's Redis.
    Heartbeats are off unless asked for; the body limit is MAX_BODY."""
    running: list[Running] = []

    def start(**overrides: Any) -> Running:
        options: dict[str, Any] = {
            "port": free_port(),
            "instance": "kit-test-1",
            "bus": bus_settings,
            "heartbeat": False,
            "max_body_bytes": MAX_BODY,
            **overrides,
        }
        settings = KitSettings(**options)
        probe = Probe()
        app = build_app(settings, probe, big_limit=BIG_LIMIT)
        server, thread = run_in_thread(app, settings)
        client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
        running.append(Running(app, probe, settings, server, thread, client))
        return running[-1]

    yield start
    for r in running:
        r.stop()


@pytest.fixture
def app(start_app: Callable[..., Running]) -> Running:
    return start_app()


# --- errors ---------------------------------------------------------------------------------


def test_validation_error_has_the_one_error_shape(app: Running) -> None:
    response = app.client.post("/items", json={"name": "x", "count": "many"})
    assert response.status_code == 422
    body = error_of(response)
    assert body.error.type == "validation_error"
    assert body.error.location == ["body", "count"]
    assert body.error.message.startswith("body.count: ")
    assert "integer" in body.error.message
    errors = body.error.details["errors"]
    assert errors == [{"location": ["body", "count"], "message": errors[0]["message"]}]
    assert app.probe.calls["create_item"] == 0

    # Several errors: the first is the message, all are in details.
    response = app.client.post("/items", json={"count": -1})
    body = error_of(response)
    assert response.status_code == 422
    assert "(and 1 more)" in body.error.message
    locations = [e["location"] for e in body.error.details["errors"]]
    assert sorted(locations) == [["body", "count"], ["body", "name"]]

    # Not JSON at all.
    response = app.client.post(
        "/items", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert error_of(response).error.type == "validation_error"


def test_api_error_keeps_status_type_location_details_and_headers(app: Running) -> None:
    response = app.client.get("/conflict")
    assert response.status_code == 409
    assert response.headers["x-existing-id"] == "42"
    body = error_of(response)
    assert body.error.type == "conflict"
    assert body.error.message == "an item named 'x' exists"
    assert body.error.location == ["body", "name"]
    assert body.error.details == {"existing_id": 42}


def test_unknown_route_and_wrong_method(app: Running) -> None:
    response = app.client.get("/no/such/route")
    assert response.status_code == 404
    body = error_of(response)
    assert body.error.type == "not_found"
    assert "/no/such/route" in body.error.message

    response = app.client.delete("/items/1")
    assert response.status_code == 405
    assert error_of(response).error.type == "method_not_allowed"
    assert "GET" in response.headers["allow"]


def test_wrong_method_allows_every_method_of_the_path(app: Running) -> None:
    # POST /upload and GET /upload are two routes: the first alone would say "POST".
    response = app.client.delete("/upload")
    assert response.status_code == 405
    assert error_of(response).error.type == "method_not_allowed"
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed


def test_deeply_nested_body_is_422_and_the_connection_stays_usable(app: Running) -> None:
    # Deeper than the interpreter's recursion limit, and inside this app's body limit.
    deep = b"[" * (sys.getrecursionlimit() * 3)
    assert len(deep) <= MAX_BODY
    for path in ("/parse", "/items"):
        response = app.client.post(path, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        body = error_of(response)
        assert body.error.type == "validation_error"
        assert body.error.location == ["body"]
        # The same client (the same keep-alive connection) is served next.
        assert app.client.get("/items/1").status_code == 200


def test_a_body_that_is_not_text_is_422_not_a_bare_400(app: Running) -> None:
    response = app.client.post(
        "/items", content=b"\xff\xfe\x80", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    body = error_of(response)
    assert (body.error.type, body.error.location) == ("validation_error", ["body"])

    # A multipart form that is not one: Starlette's own bare 400, made the same 422.
    response = app.client.post(
        "/form",
        content=b"--b\r\nnot a part--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 422, response.text
    body = error_of(response)
    assert (body.error.type, body.error.location) == ("validation_error", ["body"])


def test_error_answers_of_text_routes_are_documented_as_json(app: Running) -> None:
    document = app.client.get("/openapi.json").json()
    answers = document["paths"]["/report"]["get"]["responses"]
    assert set(answers["200"]["content"]) == {"text/html"}
    for code in ("404", "422"):
        assert set(answers[code]["content"]) == {"application/json"}, answers[code]
        assert answers[code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }
    assert app.client.get("/report", params={"missing": "true"}).status_code == 404


def test_guarded_operations_document_their_401_and_403(start_app: Callable[..., Running]) -> None:
    app = start_app(api_token=SecretStr("kit-token"))
    document = app.client.get("/openapi.json").json()
    guarded = document["paths"]["/items"]["post"]
    assert guarded["security"]
    for code in ("401", "403"):
        schema = guarded["responses"][code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    open_route = document["paths"]["/items/{item_id}"]["get"]
    assert "security" not in open_route and "401" not in open_route["responses"]
    # The documented answers are the ones given.
    assert app.client.post("/items", json={"name": "x"}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert app.client.post("/items", json={"name": "x"}, headers=wrong).status_code == 403


def test_unexpected_exception_is_500_without_its_text_and_logged(
    app: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="esper.service")
    response = app.client.get("/crash")
    assert response.status_code == 500
    body = error_of(response)
    assert body.error.type == "internal"
    assert "RuntimeError" in body.error.message
    assert "secret-internal-detail" not in response.text
    assert app.probe.calls["crash"] == 1

    def logged() -> logging.LogRecord | None:
        for record in caplog.records:
            if record.name == "esper.service" and record.exc_info:
                return record
        return None

    record = wait_for(logged, "the traceback in the log")
    assert "GET /crash" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "secret-internal-detail" in logging.Formatter().formatException(record.exc_info)

    # The service goes on serving. (A fresh connection: uvicorn closes the one that carried the
    # crash, since Starlette re-raises after the 500 is sent, so a pooled one may be reset.)
    assert httpx.get(f"{app.url}/healthz", timeout=5).status_code == 200


# --- auth -----------------------------------------------------------------------------------


def test_no_token_configured_leaves_mutating_routes_open(app: Running) -> None:
    response = app.client.post("/items", json={"name": "open"})
    assert response.status_code == 200
    assert response.json() == {"id": 1, "name": "open", "count": 1}


def test_token_guards_mutating_routes_only(start_app: Callable[..., Running]) -> None:
    app = start_app(api_token=SecretStr("s3cret-token"))
    item = {"name": "guarded"}

    missing = app.client.post("/items", json=item)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert error_of(missing).error.type == "unauthorized"
    assert error_of(missing).error.location == ["header", "authorization"]

    for header in ("Basic czNjcmV0LXRva2Vu", "s3cret-token", "Bearer", "Token s3cret-token"):
        response = app.client.post("/items", json=item, headers={"Authorization": header})
        assert response.status_code == 401, header
        assert error_of(response).error.type == "unauthorized"

    wrong = app.client.post("/items", json=item, headers={"Authorization": "Bearer s3cret"})
    assert wrong.status_code == 403
    assert error_of(wrong).error.type == "forbidden"
    assert "s3cret" not in wrong.text
    assert app.probe.calls["create_item"] == 0

    right = app.client.post("/items", json=item, headers={"Authorization": "Bearer s3cret-token"})
    assert right.status_code == 200
    lower = app.client.post("/items", json=item, headers={"Authorization": "bearer s3cret-token"})
    assert lower.status_code == 200
    assert app.probe.calls["create_item"] == 2

    for path in ("/items/3", "/healthz", "/readyz", "/metrics"):
        assert app.client.get(path).status_code == 200, path


# --- body limit -----------------------------------------------------------------------------


def chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    """A body httpx sends chunked (no Content-Length): `total` bytes in `size` pieces."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"x" * piece


def test_declared_body_over_the_limit_is_refused_before_the_handler(app: Running) -> None:
    for path in ("/items", "/upload"):
        response = app.client.post(
            path, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, path
        body = error_of(response)
        assert body.error.type == "payload_too_large"
        assert body.error.details["limit_bytes"] == MAX_BODY
    assert app.probe.calls["create_item"] == 0
    assert app.probe.calls["upload"] == 0

    # At the limit is fine.
    response = app.client.post("/upload", content=b"x" * MAX_BODY)
    assert response.status_code == 200
    assert response.json() == {"received": MAX_BODY}


def test_chunked_body_over_the_limit_is_refused_while_reading_raw(app: Running) -> None:
    response = app.client.post("/upload", content=chunks(MAX_BODY * 4))
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert error_of(response).error.type == "payload_too_large"

    response = app.client.post("/upload", content=chunks(MAX_BODY - 10))
    assert response.status_code == 200
    assert response.json() == {"received": MAX_BODY - 10}


def test_chunked_body_over_the_limit_is_refused_for_a_model_body(app: Running) -> None:
    def json_chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        yield from chunks(MAX_BODY * 4)
        yield b'"}'

    response = app.client.post(
        "/items", content=json_chunks(), headers={"content-type": "application/json"}
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413, response.text
    assert error_of(response).error.type == "payload_too_large"
    assert app.probe.calls["create_item"] == 0


def test_per_path_limit_raises_the_limit_for_that_path_only(app: Running) -> None:
    size = MAX_BODY * 4
    response = app.client.post("/big", content=b"x" * size)
    assert response.status_code == 200
    assert response.json() == {"received": size}
    response = app.client.post("/big", content=chunks(size))
    assert response.status_code == 200
    assert response.json() == {"received": size}

    over = app.client.post("/big", content=b"x" * (BIG_LIMIT + 1))
    assert over.status_code == 413
    assert error_of(over).error.details["limit_bytes"] == BIG_LIMIT
    assert app.probe.calls["big"] == 2  # refused from Content-Length: the handler never ran
    over = app.client.post("/big", content=chunks(BIG_LIMIT + 1))
    assert over.status_code == 413
    assert error_of(over).error.details["limit_bytes"] == BIG_LIMIT

    assert app.client.post("/upload", content=b"x" * size).status_code == 413
    assert app.client.post("/upload", content=chunks(size)).status_code == 413
    assert app.probe.calls["upload"] == 1  # the chunked one: it ran, and its read was refused


# --- probes and metrics ---------------------------------------------------------------------


def test_healthz_and_readyz(app: Running, redis_server: RedisServer) -> None:
    response = app.client.get("/healthz")
    assert response.status_code == 200
    health = HealthStatus.model_validate(response.json())
    assert (health.status, health.service, health.version) == ("ok", SERVICE, VERSION)

    response = app.client.get("/readyz")
    assert response.status_code == 200
    ready = Readiness.model_validate(response.json())
    assert ready.status == "ready"
    assert ready.checks == {"redis": True, "custom": True}

    app.probe.result = "disk full"
    response = app.client.get("/readyz")
    assert response.status_code == 503
    ready = Readiness.model_validate(response.json())
    assert ready.status == "not_ready"
    assert ready.checks == {"redis": True, "custom": "disk full"}

    app.probe.result = True
    redis_server.stop()
    started = time.monotonic()
    response = app.client.get("/readyz")
    assert time.monotonic() - started < 3.0
    assert response.status_code == 503
    ready = Readiness.model_validate(response.json())
    assert ready.status == "not_ready"
    assert isinstance(ready.checks["redis"], str)
    assert ready.checks["redis"].startswith("redis unreachable")
    assert ready.checks["custom"] is True
    assert app.client.get("/healthz").status_code == 200


def test_metrics_count_route_templates(app: Running) -> None:
    for item_id in (7, 8):
        assert app.client.get(f"/items/{item_id}").status_code == 200
    assert app.client.get("/items/not-a-number").status_code == 422
    assert app.client.get("/nowhere/at/all").status_code == 404

    response = app.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    def sample(name: str, labels: dict[str, str]) -> float | None:
        for line in text.splitlines():
            match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
            if match is None:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(2))
        return None

    route = {"service": SERVICE, "method": "GET", "route": "/items/{item_id}"}
    assert sample("esper_http_requests_total", {**route, "status": "200"}) == 2.0
    assert sample("esper_http_requests_total", {**route, "status": "422"}) == 1.0
    assert sample("esper_http_request_duration_seconds_count", route) == 3.0
    assert sample("esper_http_request_duration_seconds_bucket", {**route, "le": "+Inf"}) == 3.0
    assert "# TYPE esper_http_request_duration_seconds histogram" in text
    unmatched = {"route": "unmatched", "status": "404"}
    assert sample("esper_http_requests_total", unmatched) == 1.0
    # Raw paths never become labels.
    assert 'route="/items/7"' not in text
    assert "/nowhere/at/all" not in text


# --- heartbeat ------------------------------------------------------------------------------


def beats(client: redis.Redis, settings: BusSettings) -> list[tuple[Envelope, Heartbeat]]:
    out = []
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(settings.stream("health")))
    for _, fields in entries:
        envelope = Envelope.decode(fields[b"envelope"])
        message = envelope.message()
        assert isinstance(message, Heartbeat)
        out.append((envelope, message))
    return out


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_heartbeat_publishes_and_reports_degraded(
    start_app: Callable[..., Running], redis_client: redis.Redis, bus_settings: BusSettings
) -> None:
    app = start_app(heartbeat=True, heartbeat_interval_s=0.2)
    found = wait_for(lambda: len(beats(redis_client, bus_settings)) >= 3 or None, "three beats")
    assert found
    for envelope, beat in beats(redis_client, bus_settings):
        assert envelope.type == "health.heartbeat"
        assert envelope.source == SERVICE
        assert (beat.service, beat.instance, beat.status) == (SERVICE, "kit-test-1", "ok")
        assert beat.interval_s == 0.2
        assert beat.details == {"redis": True, "custom": True}

    app.probe.result = "disk full"

    def degraded() -> Heartbeat | None:
        for _, beat in beats(redis_client, bus_settings):
            if beat.status == "degraded":
                return beat
        return None

    beat = wait_for(degraded, "a degraded beat")
    assert beat.details == {"redis": True, "custom": "disk full"}


def test_heartbeat_survives_a_redis_outage(
    start_app: Callable[..., Running],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    bus_settings: BusSettings,
) -> None:
    app = start_app(heartbeat=True, heartbeat_interval_s=0.2)
    wait_for(lambda: beats(redis_client, bus_settings), "a first beat")

    redis_server.stop()
    # The heartbeat keeps failing to publish for a while; the app keeps serving meanwhile.
    outage_ends = time.monotonic() + 1.0
    while time.monotonic() < outage_ends:
        started = time.monotonic()
        assert app.client.get("/healthz").status_code == 200
        assert app.client.get("/items/1").status_code == 200
        assert time.monotonic() - started < 1.0
        time.sleep(0.05)
    assert app.client.get("/readyz").status_code == 503

    # Same port; no persistence, so the health stream starts empty. A beat taken during the
    # outage may land first (its publish was still retrying): it says degraded, naming redis.
    redis_server.restart()
    beat = wait_for(
        lambda: next((b for _, b in beats(redis_client, bus_settings) if b.status == "ok"), None),
        "a beat after Redis came back",
    )
    assert beat.details["redis"] is True
    for _, stale in beats(redis_client, bus_settings):
        if stale.status != "ok":
            assert str(stale.details["redis"]).startswith("redis unreachable")
    assert app.client.get("/readyz").status_code == 200


# --- settings -------------------------------------------------------------------------------


def test_settings_read_the_subclass_prefix_and_the_bus_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KITDEMO_PORT", "9123")
    monkeypatch.setenv("KITDEMO_API_TOKEN", "tok-1")
    monkeypatch.setenv("KITDEMO_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("KITDEMO_HEARTBEAT_INTERVAL_S", "0.5")
    monkeypatch.setenv("KITDEMO_INSTANCE", "pod-7")
    monkeypatch.setenv("ESPER_SERVICE_PORT", "1111")  # the base prefix is not the subclass's
    monkeypatch.setenv("ESPER_SERVICE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ESPER_BUS_REDIS_URL", "redis://bus.example:6390/3")
    monkeypatch.setenv("ESPER_BUS_PREFIX", "staging")

    settings = KitSettings()
    assert settings.port == 9123
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "tok-1"
    assert "tok-1" not in repr(settings)
    assert settings.max_body_bytes == 2048
    assert settings.heartbeat_interval_s == 0.5
    assert settings.instance == "pod-7"
    assert settings.log_level == "INFO"
    assert settings.bus.redis_url == "redis://bus.example:6390/3"
    assert settings.bus.stream("health") == "staging:health"


def test_settings_defaults_and_invalid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("KITDEMO_", "ESPER_BUS_")):
            monkeypatch.delenv(name)
    settings = KitSettings()
    assert settings.port == 8099
    assert settings.api_token is None
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}", settings.instance)

    for name, value in (
        ("KITDEMO_PORT", "70000"),
        ("KITDEMO_MAX_BODY_BYTES", "10"),
        ("KITDEMO_HEARTBEAT_INTERVAL_S", "0"),
        ("KITDEMO_LOG_LEVEL", "LOUD"),
        ("KITDEMO_INSTANCE", "no spaces allowed"),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ValidationError):
                KitSettings()
    with pytest.raises(ValidationError):
        KitSettings(port=70000)


# --- logs -----------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("kit-demo", "pod-7"))
    logger = logging.getLogger("esper.test.kit.json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.info(
            "hello %s",
            "world",
            extra={"job_id": "job-1", "epoch": 3, "ok": True, "obj": {"a": 1}},
        )
        logger.warning("coloured", extra={"color_message": "\x1b[31mcoloured\x1b[0m"})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.handlers[:] = []

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)

    assert first["message"] == "hello world"
    assert first["level"] == "INFO"
    assert first["service"] == "kit-demo"
    assert first["instance"] == "pod-7"
    assert first["logger"] == "esper.test.kit.json"
    assert isinstance(first["ts"], float)
    assert abs(first["ts"] - time.time()) < 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first["time"])
    assert (first["job_id"], first["epoch"], first["ok"]) == ("job-1", 3, True)
    assert first["obj"] == str({"a": 1})
    assert "exception" not in first
    for standard in ("msg", "args", "levelno", "pathname", "exc_info"):
        assert standard not in first

    assert second["level"] == "WARNING"
    assert "color_message" not in second

    assert third["level"] == "ERROR"
    assert third["message"] == "it failed"
    assert "Traceback" in third["exception"]
    assert "ValueError: boom\nsecond line" in third["exception"]


# --- a service as a real process ------------------------------------------------------------


def demo_env(redis_url: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    return {
        "PYTHONPATH": path,
        "ESPER_BUS_REDIS_URL": redis_url,
        "KITDEMO_INSTANCE": "proc-1",
        "KITDEMO_HEARTBEAT_INTERVAL_S": "0.2",
        **extra,
    }


def test_service_process_drops_the_inherited_variables_it_is_told_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A developer's KITDEMO_* shell variables must not reach a test's service; what the test
    passes, the port and everything else inherited do."""
    monkeypatch.setenv("KITDEMO_MAX_BODY_BYTES", "1")
    monkeypatch.setenv("KITDEMO_INSTANCE", "from-the-shell")
    monkeypatch.setenv("UNRELATED_VARIABLE", "kept")
    proc = ServiceProcess(
        "kit_demo_service",
        port_env="KITDEMO_PORT",
        env={"KITDEMO_INSTANCE": "from-the-test"},
        drop_inherited=("KITDEMO_",),
    )
    assert "KITDEMO_MAX_BODY_BYTES" not in proc.env
    assert proc.env["KITDEMO_INSTANCE"] == "from-the-test"
    assert proc.env["KITDEMO_PORT"] == str(proc.port)
    assert proc.env["UNRELATED_VARIABLE"] == "kept"
    assert ServiceProcess("x", port_env="X_PORT").env["KITDEMO_MAX_BODY_BYTES"] == "1"


def test_service_process_runs_restarts_and_logs_json(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with ServiceProcess(
        "kit_demo_service",
        port_env="KITDEMO_PORT",
        env=demo_env(redis_url),
        startup_timeout_s=30,
        log_dir=tmp_path,
    ) as proc:
        url, pid = proc.url, proc.pid
        health = httpx.get(f"{url}/healthz", timeout=5)
        assert HealthStatus.model_validate(health.json()).service == SERVICE
        assert httpx.get(f"{url}/items/5", timeout=5).json()["id"] == 5
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200

        # configure_logging: every line is a JSON object; the kit logs each request by template.
        def request_logged() -> dict[str, Any] | None:
            for line in proc.log_path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("route") == "/items/{item_id}":
                    return entry  # type: ignore[no-any-return]
            return None

        entry = wait_for(request_logged, "the request log line")
        assert (entry["service"], entry["instance"], entry["status"]) == (SERVICE, "proc-1", 200)
        assert entry["logger"] == "esper.service.access"

        settings = BusSettings(redis_url=redis_url)
        beat = wait_for(lambda: beats(redis_client, settings), "a beat from the process")[0][1]
        assert (beat.service, beat.instance, beat.status) == (SERVICE, "proc-1", "ok")

        proc.kill()
        assert not proc.running
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
        proc.restart()
        assert proc.url == url
        assert proc.pid != pid
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert not proc.running


def test_service_process_start_failure_shows_the_log_tail(redis_url: str, tmp_path: Path) -> None:
    proc = ServiceProcess(
        "kit_demo_service",
        port_env="KITDEMO_PORT",
        env=demo_env(redis_url, KITDEMO_CRASH="1"),
        startup_timeout_s=30,
        log_dir=tmp_path,
    )
    with pytest.raises(ServiceStartError) as caught:
        proc.start()
    message = str(caught.value)
    assert "kit_demo_service exited with 1" in message
    assert CRASH_MESSAGE in message
    assert "Traceback" in message
    assert not proc.running

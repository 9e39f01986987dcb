"""The kit's plumbing every service shares: the settings dependency, the error table, background
loops, atomic file writes, and the local processes `esper up` runs on."""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import pytest
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI
from pydantic import Field
from pydantic_settings import SettingsConfigDict

import esper
import esper.processes
import esper.testing
from esper.contracts.api import ErrorBody
from esper.files import atomic_write
from esper.service import (
    ErrorMapping,
    ErrorTable,
    Periodic,
    ServiceSettings,
    create_app,
    path_param,
    run_every,
    settings_dependency,
)


class PlumbingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PLUMBING_", extra="ignore", frozen=True)

    greeting: str = Field(default="hello")


class OtherSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OTHER_", extra="ignore", frozen=True)


get_settings = settings_dependency(PlumbingSettings)
SettingsDep = Annotated[PlumbingSettings, Depends(get_settings)]


class Missing(LookupError):
    pass


class Vanished(Missing):
    pass


class Refused(Exception):
    def __init__(self, kind: str, message: str, location: list[str | int]) -> None:
        super().__init__(message)
        self.kind = kind
        self.location = location


ERRORS: ErrorTable = {
    Missing: ErrorMapping(404, "missing", path_param("item_id", "ref", otherwise=["body", "name"])),
    Vanished: ErrorMapping(410, "vanished", ["path", "item_id"], headers={"Retry-After": "7"}),
    Refused: ErrorMapping(409),
    ValueError: ErrorMapping(422),
}


def plumbing_router() -> APIRouter:
    router = APIRouter()

    @router.get("/greeting")
    async def greeting(settings: SettingsDep) -> dict[str, str]:
        return {"greeting": settings.greeting}

    @router.get("/items/{item_id}")
    async def item(item_id: str) -> None:
        raise Missing(f"no item {item_id!r}")

    @router.get("/refs/{ref}")
    async def by_ref(ref: str) -> None:
        raise Missing(f"no ref {ref!r}")

    @router.post("/items")
    async def create() -> None:
        raise Missing("no such template")

    @router.delete("/items/{item_id}")
    async def delete(item_id: str) -> None:
        raise Vanished(f"item {item_id!r} is gone")

    @router.put("/items/{item_id}")
    async def refuse(item_id: str) -> None:
        raise Refused("item_locked", f"item {item_id!r} is locked", ["path", "item_id"])

    @router.patch("/items/{item_id}")
    async def invalid(item_id: str) -> None:
        raise ValueError("x" * 5000)

    return router


def build(settings: ServiceSettings) -> FastAPI:
    return create_app(
        service="plumbing",
        version="0.0.1",
        settings=settings,
        routers=[plumbing_router()],
        errors=ERRORS,
    )


def client_of(app: FastAPI) -> httpx.AsyncClient:
    # No lifespan: these routes need neither Redis nor the producer.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://plumbing")


def error_of(response: httpx.Response) -> ErrorBody:
    return ErrorBody.model_validate(response.json())


# --- settings -------------------------------------------------------------------------------


async def test_routes_get_the_settings_the_app_was_built_with() -> None:
    async with client_of(build(PlumbingSettings(greeting="hi there", heartbeat=False))) as client:
        assert (await client.get("/greeting")).json() == {"greeting": "hi there"}


async def test_the_settings_dependency_can_still_be_overridden() -> None:
    app = build(PlumbingSettings(heartbeat=False))
    app.dependency_overrides[get_settings] = lambda: PlumbingSettings(greeting="overridden")
    async with client_of(app) as client:
        assert (await client.get("/greeting")).json() == {"greeting": "overridden"}


async def test_settings_of_another_service_are_refused() -> None:
    async with client_of(build(OtherSettings(heartbeat=False))) as client:
        response = await client.get("/greeting")
    assert response.status_code == 500
    assert error_of(response).error.type == "internal"


# --- the error table ------------------------------------------------------------------------


@pytest.fixture
async def client() -> Any:
    async with client_of(build(PlumbingSettings(heartbeat=False))) as client:
        yield client


async def test_an_exception_maps_to_its_status_type_and_path_parameter(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/items/abc")
    assert response.status_code == 404
    info = error_of(response).error
    assert (info.type, info.message, info.location) == (
        "missing",
        "no item 'abc'",
        ["path", "item_id"],
    )

    info = error_of(await client.get("/refs/xyz")).error
    assert info.location == ["path", "ref"]
    info = error_of(await client.post("/items")).error
    assert (info.type, info.location) == ("missing", ["body", "name"])


async def test_the_closest_class_wins_and_brings_its_headers(client: httpx.AsyncClient) -> None:
    response = await client.delete("/items/abc")
    assert response.status_code == 410
    assert response.headers["retry-after"] == "7"
    info = error_of(response).error
    assert (info.type, info.location) == ("vanished", ["path", "item_id"])


async def test_an_exception_may_bring_its_own_type_and_location(client: httpx.AsyncClient) -> None:
    response = await client.put("/items/abc")
    assert response.status_code == 409
    info = error_of(response).error
    assert (info.type, info.message, info.location) == (
        "item_locked",
        "item 'abc' is locked",
        ["path", "item_id"],
    )


async def test_without_a_type_the_status_names_it_and_the_message_is_bounded(
    client: httpx.AsyncClient,
) -> None:
    response = await client.patch("/items/abc")
    assert response.status_code == 422
    info = error_of(response).error
    assert (info.type, info.location, len(info.message)) == ("validation_error", None, 4000)


@pytest.mark.parametrize(
    "outage",
    [
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379."),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    ],
)
async def test_redis_away_is_503_with_retry_after_on_every_service(outage: Exception) -> None:
    router = APIRouter()

    @router.get("/needs-redis")
    async def needs_redis() -> None:
        raise outage

    app = create_app(
        service="plumbing",
        version="0.0.1",
        settings=PlumbingSettings(heartbeat=False),
        routers=[router],
    )
    async with client_of(app) as client:
        response = await client.get("/needs-redis")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert error_of(response).error.type == "unavailable"


# --- background loops -----------------------------------------------------------------------


async def test_run_every_survives_failures_and_stops_when_told() -> None:
    rounds: list[float] = []
    stop = asyncio.Event()

    async def step() -> None:
        rounds.append(time.monotonic())
        if len(rounds) == 2:
            raise redis.exceptions.ConnectionError("redis away")
        if len(rounds) == 3:
            raise RuntimeError("a bug")
        if len(rounds) == 5:
            stop.set()

    await asyncio.wait_for(run_every(0.01, step, name="test loop", stop=stop), 5)
    assert len(rounds) == 5


async def test_run_every_logs_an_outage_briefly_and_a_bug_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    failures = [redis.exceptions.ConnectionError("redis away"), RuntimeError("a bug")]

    async def step() -> None:
        if not failures:
            stop.set()
            return
        raise failures.pop(0)

    logger = logging.getLogger("esper.tests.plumbing")
    with caplog.at_level(logging.WARNING, logger="esper.tests.plumbing"):
        await asyncio.wait_for(run_every(0.01, step, name="poll", stop=stop, logger=logger), 5)
    outage, bug = [r for r in caplog.records if r.name == "esper.tests.plumbing"]
    assert outage.levelno == logging.WARNING and outage.exc_info is None
    assert "poll failed: ConnectionError: redis away" in outage.getMessage()
    assert bug.levelno == logging.ERROR and bug.exc_info is not None


async def test_run_every_waits_first_when_asked_and_a_stop_ends_the_wait_at_once() -> None:
    rounds = 0

    async def step() -> None:
        nonlocal rounds
        rounds += 1

    stop = asyncio.Event()
    task = asyncio.create_task(run_every(60, step, name="slow", stop=stop, wait_first=True))
    await asyncio.sleep(0.05)
    assert rounds == 0
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 1)
    assert rounds == 0 and time.monotonic() - started < 0.5


async def test_periodic_stop_cancels_a_round_that_hangs() -> None:
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.sleep(3600)

    loop = Periodic("hanging", 0.01, hang).start()
    await asyncio.wait_for(entered.wait(), 1)
    assert loop.running
    started = time.monotonic()
    await loop.stop()
    assert not loop.running and time.monotonic() - started < 0.5


# --- atomic writes --------------------------------------------------------------------------


def test_atomic_write_writes_bytes_or_streams_into_the_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.bin"
    atomic_write(target, b"first")
    assert target.read_bytes() == b"first"

    def stream(handle: BinaryIO) -> None:
        handle.write(b"second, ")
        handle.write(b"streamed")

    atomic_write(target, stream)
    assert target.read_bytes() == b"second, streamed"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write(target, b"old")

    def fail_halfway(handle: BinaryIO) -> None:
        handle.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_write_names_its_temp_file_with_the_given_prefix(tmp_path: Path) -> None:
    seen: list[str] = []

    def look(handle: BinaryIO) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())

    atomic_write(tmp_path / "blob", look, temp_prefix=".tmp-")
    assert len(seen) == 1 and seen[0].startswith(".tmp-") and seen[0].endswith(".tmp")


# --- local processes ------------------------------------------------------------------------


def test_the_test_helpers_are_the_library_s_process_classes() -> None:
    assert esper.testing.RedisServer is esper.processes.RedisServer
    assert esper.testing.ServiceProcess is esper.processes.ServiceProcess
    assert esper.testing.ServiceStartError is esper.processes.ServiceStartError
    assert esper.testing.free_port is esper.processes.free_port


def test_the_library_does_not_import_its_test_helpers() -> None:
    """`esper up` ships in the library; the test helpers (and pytest) must not be needed to run
    it."""
    root = Path(esper.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if root / "testing" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            if any(n == "esper.testing" or n.startswith("esper.testing.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []

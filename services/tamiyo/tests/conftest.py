"""Fixtures for Tamiyo's tests: a real redis-server per test (the esper.testing plugin), and
for the API tests a Redis and a Tamiyo process per module, talked to over real HTTP."""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from esper.bus import BusSettings
from esper.testing import RedisServer, ServiceProcess

# Registered by import, as urza's conftest explains (pytest_plugins is refused below rootdir).
from esper.testing.pytest_plugin import (  # noqa: F401
    bus_settings,
    redis_server,
    redis_server_factory,
    redis_url,
)

# Helpers beside the tests are imported by name; importlib mode does not add this directory.
sys.path.insert(0, str(Path(__file__).parent))
from tamiyo_helpers import TOKEN, Harness

_instances = itertools.count()
_OURS = ("TAMIYO_", "ESPER_BUS_")


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def bus_prefix() -> str:
    return f"tamiyo-test-{next(_instances)}"


@pytest.fixture(scope="module")
def tamiyo(
    module_redis: RedisServer, bus_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Tamiyo with the built-in blueprints (no Urza), a token, and a short warm-up."""
    logs = tmp_path_factory.mktemp("tamiyo")
    env = {
        "TAMIYO_URZA_URL": "",
        "TAMIYO_API_TOKEN": TOKEN,
        "TAMIYO_LOG_JSON": "false",
        "TAMIYO_HEARTBEAT_INTERVAL_S": "0.5",
        "TAMIYO_WARMUP_EPOCHS": "1",
        "TAMIYO_PATIENCE": "2",
        "TAMIYO_TRAIN_STALL_DELTA": "0.02",
        "TAMIYO_INSTANCE": f"tamiyo-test-{next(_instances)}",
        "ESPER_BUS_REDIS_URL": module_redis.url,
        "ESPER_BUS_PREFIX": bus_prefix,
        "ESPER_BUS_BLOCK_MS": "100",
        "ESPER_BUS_CLAIM_IDLE_MS": "1000",
    }
    # A developer's TAMIYO_* / ESPER_BUS_* variables must not change what the tests expect.
    service = ServiceProcess(
        "tamiyo", port_env="TAMIYO_PORT", env=env, log_dir=logs, drop_inherited=_OURS
    )
    with service:
        yield service


@pytest.fixture
def client(tamiyo: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tamiyo.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture
async def harness(bus_settings: BusSettings) -> AsyncIterator[Harness]:  # noqa: F811
    """Controllers on a real Redis, a producer standing in for Tolaria, the control stream."""
    h = Harness(bus_settings)
    yield h
    await h.close()

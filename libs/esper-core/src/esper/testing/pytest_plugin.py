"""pytest fixtures backed by a real redis-server (see redis_server.py).

Enable with `pytest_plugins = ["esper.testing.pytest_plugin"]` in a conftest.py.

- `redis_server`: a fresh server per test (no persistence: fast, and no test sees another's data).
- `redis_url`: its URL.
- `bus_settings`: BusSettings for that server with test-sized timings (100 ms blocking reads,
  300 ms claim idle, fast backoff), so failure paths finish in well under a second.
- `redis_server_factory`: call it for more servers or other options, e.g.
  `redis_server_factory(appendonly=True)` for crash/restart tests; all are torn down after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from esper.bus.settings import BusSettings
from esper.testing.redis_server import RedisServer

#: Timings small enough that retries, reclaims and reconnects happen within a test's patience.
FAST_BUS = {
    "block_ms": 100,
    "socket_timeout_s": 1.0,
    "connect_timeout_s": 0.5,
    "claim_idle_ms": 300,
    "reclaim_interval_ms": 50,
    "max_deliveries": 3,
    "handler_timeout_s": 10.0,
    "reconnect_backoff_min_s": 0.01,
    "reconnect_backoff_max_s": 0.2,
    "retry_timeout_s": 15.0,
    "flush_interval_s": 0.02,
}


def bus_settings_for(url: str, **overrides: Any) -> BusSettings:
    """BusSettings with FAST_BUS timings for a test server; `overrides` win."""
    return BusSettings(**{"redis_url": url, **FAST_BUS, **overrides})


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(**options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def bus_settings(redis_url: str) -> BusSettings:
    return bus_settings_for(redis_url)

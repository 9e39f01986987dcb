"""Fixtures for Urza's API tests: a real redis-server, Urza as a real process (`python -m urza`)
on a free port, and httpx clients talking to it over real HTTP.

Processes are few and long-lived: one Redis and one Urza per test module (each module gets its own
data directory, so no module sees another's kernels), plus `urza_factory` for a test that needs an
Urza with other settings. Fixtures hand out library types (ServiceProcess, RedisServer,
httpx.Client, redis.Redis) so that test modules never import this file: that works the same under
pytest's `prepend` and `importlib` import modes. `redis_module` is a Redis per module here, as
`esper.testing.pytest_plugin`'s `redis_server` is one per test (those fixtures are available too).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from esper.testing import RedisServer, ServiceProcess

# The plugin's per-test Redis fixtures (`redis_server`, `redis_url`, `redis_server_factory`,
# `bus_settings`), registered by import rather than `pytest_plugins`: pytest refuses
# `pytest_plugins` in a conftest below the rootdir unless that conftest is named on the command
# line, and an import registers nothing twice when libs/esper-core/tests runs in the same session.
from esper.testing.pytest_plugin import (  # noqa: F401
    bus_settings,
    redis_server,
    redis_server_factory,
    redis_url,
)

TOKEN = "urza-test-token"
SIGNING_KEY = "urza-test-signing-key"
ADMIN_TOKEN = "urza-test-admin-token"
"""URZA_ADMIN_TOKEN: sent as `X-Esper-Admin-Token`, it lets an upload be TorchScript."""
HEARTBEAT_INTERVAL_S = 0.2
BUS_PREFIX = "esper"
"""The module Urza publishes on `esper:events` and `esper:health`; factory Urzas get their own
prefix, so their events never land on the module Urza's streams."""

_instances = itertools.count()
_OURS = ("URZA_", "ESPER_BUS_")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tests that compile in this process (test_store) are several times slower on two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def urza_process(
    data_dir: Path, bus_url: str, prefix: str, log_dir: Path, **overrides: str
) -> ServiceProcess:
    """An Urza process (not started yet); `overrides` are `URZA_*` (or other) variables. `URZA_*`
    and `ESPER_BUS_*` variables of the environment the tests run in are not passed on, so a
    developer's shell cannot change the limits these tests expect."""
    env = {
        "URZA_DATA_DIR": str(data_dir),
        "URZA_API_TOKEN": TOKEN,
        "URZA_SIGNING_KEY": SIGNING_KEY,
        "URZA_ADMIN_TOKEN": ADMIN_TOKEN,
        "URZA_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
        "URZA_LOG_JSON": "false",
        "URZA_INSTANCE": f"urza-test-{next(_instances)}",
        "ESPER_BUS_REDIS_URL": bus_url,
        "ESPER_BUS_PREFIX": prefix,
        **overrides,
    }
    return ServiceProcess(
        "urza", port_env="URZA_PORT", env=env, log_dir=log_dir, drop_inherited=_OURS
    )


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One redis-server for the whole module (the plugin's `redis_server` is per test)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def urza(
    redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """This module's Urza: token, signing key, fast heartbeats, its own data directory
    (`Path(urza.env["URZA_DATA_DIR"])`). Tests may stop/kill and restart it; it is the same URL."""
    service = urza_process(
        tmp_path_factory.mktemp("urza-data"),
        redis_module.url,
        BUS_PREFIX,
        tmp_path_factory.mktemp("urza-log"),
    )
    with service:
        yield service


class _UrzaFactory:
    def __init__(self, bus_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.bus_url = bus_url
        self.tmp_path_factory = tmp_path_factory
        self.started: list[ServiceProcess] = []

    def __call__(self, **env: str) -> ServiceProcess:
        service = urza_process(
            self.tmp_path_factory.mktemp("urza-data"),
            self.bus_url,
            f"urza-factory-{next(_instances)}",
            self.tmp_path_factory.mktemp("urza-log"),
            **env,
        )
        self.started.append(service)
        return service.start()

    def stop_all(self) -> None:
        for service in self.started:
            service.stop()


@pytest.fixture
def urza_factory(
    redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServiceProcess]]:
    """`urza_factory(URZA_MAX_UPLOAD_BYTES="4096")`: a fresh, running Urza with its own data
    directory and bus prefix on the module's Redis; stopped after the test."""
    factory = _UrzaFactory(redis_module.url, tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def urza_module_factory(
    redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServiceProcess]]:
    """`urza_factory` for module-scoped fixtures: its Urzas are stopped after the module."""
    factory = _UrzaFactory(redis_module.url, tmp_path_factory)
    yield factory
    factory.stop_all()


def client_for(service: ServiceProcess, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=service.url, headers=headers, timeout=60.0)


@pytest.fixture
def api(urza: ServiceProcess) -> Iterator[httpx.Client]:
    """An httpx client of the module's Urza carrying the right bearer token."""
    with client_for(urza) as client:
        yield client


@pytest.fixture
def anon(urza: ServiceProcess) -> Iterator[httpx.Client]:
    """An httpx client of the module's Urza without any token."""
    with client_for(urza, token=None) as client:
        yield client


@pytest.fixture
def client_factory() -> Iterator[Callable[..., httpx.Client]]:
    """`client_factory(service, token=...)`: a client of any Urza, closed after the test."""
    clients: list[httpx.Client] = []

    def make(service: ServiceProcess, token: str | None = TOKEN) -> httpx.Client:
        client = client_for(service, token)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def bus(redis_module: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client of the module's Redis, for reading the bus streams."""
    client = redis.Redis.from_url(redis_module.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def signing_key() -> bytes:
    return SIGNING_KEY.encode()


@pytest.fixture(scope="session")
def token() -> str:
    return TOKEN


@pytest.fixture(scope="session")
def admin_token() -> str:
    return ADMIN_TOKEN

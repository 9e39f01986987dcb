"""Fixtures for Tolaria's tests: a real redis-server, Urza and Tolaria as real processes on free
ports, and an httpx client. One Redis, one Urza and one Tolaria per test module; each module
gets its own data and work directories and its own bus prefix."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from esper.bus import BusSettings
from esper.testing import RedisServer, ServiceProcess
from esper.testing.pytest_plugin import (  # noqa: F401  (registered by import, see urza's conftest)
    bus_settings,
    redis_server,
    redis_server_factory,
    redis_url,
)

# Helpers beside the tests (jobhelpers) are imported by name; importlib mode does not add this dir.
sys.path.insert(0, str(Path(__file__).parent))
from jobhelpers import TOKEN

from tolaria.settings import TolariaSettings

_instances = itertools.count()
# A developer's TOLARIA_*/URZA_*/ESPER_BUS_* variables must not change what tests see.
_OURS = ("TOLARIA_", "URZA_", "ESPER_BUS_")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stack_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"t{next(_instances)}"


@pytest.fixture(scope="module")
def urza(
    stack_redis: RedisServer, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("urza")
    env = {
        "URZA_DATA_DIR": str(root / "data"),
        "URZA_LOG_JSON": "false",
        "ESPER_BUS_REDIS_URL": stack_redis.url,
        "ESPER_BUS_PREFIX": prefix,
    }
    service = ServiceProcess(
        "urza", port_env="URZA_PORT", env=env, log_dir=root, drop_inherited=_OURS
    )
    with service:
        yield service


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


TolariaFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def tolaria_factory(
    stack_redis: RedisServer,
    urza: ServiceProcess,
    prefix: str,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TolariaFactory]:
    """Tolaria replicas sharing one Redis, one Urza, one data dir and one work dir."""
    work = tmp_path_factory.mktemp("work")
    started: list[ServiceProcess] = []

    def make(**overrides: str) -> ServiceProcess:
        env = {
            "TOLARIA_DATA_DIR": str(data_dir),
            "TOLARIA_WORK_DIR": str(work),
            "TOLARIA_URZA_URL": urza.url,
            "TOLARIA_API_TOKEN": TOKEN,
            "TOLARIA_LOG_JSON": "false",
            "TOLARIA_JOB_CLAIM_IDLE_MS": "2000",
            "TOLARIA_INSTANCE": f"tolaria-{next(_instances)}",
            "ESPER_BUS_REDIS_URL": stack_redis.url,
            "ESPER_BUS_PREFIX": prefix,
            **overrides,
        }
        service = ServiceProcess(
            "tolaria", port_env="TOLARIA_PORT", env=env, log_dir=work, drop_inherited=_OURS
        )
        started.append(service.start())
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def tolaria(tolaria_factory: TolariaFactory) -> ServiceProcess:
    return tolaria_factory()


@pytest.fixture(scope="module")
def client(tolaria: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tolaria.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as c:
        yield c


@pytest.fixture
def settings(tmp_path: Path, bus_settings: BusSettings) -> TolariaSettings:  # noqa: F811
    """Settings of a job run in the test's own process (no Urza; the stop flag polled often)."""
    return TolariaSettings(
        data_dir=tmp_path,
        work_dir=tmp_path / "work",
        urza_url=None,
        bus=bus_settings,
        stop_poll_s=0.02,
    )

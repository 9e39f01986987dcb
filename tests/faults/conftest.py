"""Fixtures of the fault tests: a real redis-server with an AOF (so a kill and a restart on the
same port and directory bring its data back) and Tolaria as a real process, one each per module.
Jobs here are plain (no morphogenesis), so no Urza or Tamiyo is needed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from esper.testing import RedisServer, ServiceProcess

# The helpers beside the tests are imported by name; importlib mode does not add this dir.
sys.path.insert(0, str(Path(__file__).parent))
from faulthelpers import TOKEN

_OURS = ("TOLARIA_", "URZA_", "ESPER_BUS_")


@pytest.fixture(scope="module")
def bus_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def tolaria(
    bus_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("tolaria")
    env = {
        "TOLARIA_DATA_DIR": str(work / "data"),
        "TOLARIA_WORK_DIR": str(work),
        "TOLARIA_API_TOKEN": TOKEN,
        "TOLARIA_LOG_JSON": "false",
        "TOLARIA_INSTANCE": "tolaria-faults",
        "OMP_NUM_THREADS": "1",
        "ESPER_BUS_REDIS_URL": bus_redis.url,
        "ESPER_BUS_PREFIX": "faults",
    }
    (work / "data").mkdir()
    service = ServiceProcess(
        "tolaria", port_env="TOLARIA_PORT", env=env, log_dir=work, drop_inherited=_OURS
    )
    with service:
        yield service


@pytest.fixture(scope="module")
def client(tolaria: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tolaria.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as c:
        yield c

"""Fixtures for Nissa's tests: a real redis-server and Nissa as a real process (`python -m nissa`)
on a free port, fed real envelopes through real Redis streams.

One Redis and one Nissa per test module (each module has its own bus prefix and data directory);
`nissa_factory` starts a Nissa with other settings. Helpers shared by the modules live in
`nissahelpers.py` (imported by name: this file puts the directory on the path).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esper.testing import RedisServer, ServiceProcess
from esper.testing.pytest_plugin import (  # noqa: F401  (registered by import, see urza's conftest)
    bus_settings,
    redis_server,
    redis_server_factory,
    redis_url,
)

sys.path.insert(0, str(Path(__file__).parent))
from nissahelpers import Bus

_instances = itertools.count()
_OURS = ("NISSA_", "ESPER_BUS_")

#: Short intervals so that what Nissa does every few seconds in production happens within a test.
FAST = {
    "NISSA_LOG_JSON": "false",
    "NISSA_HEARTBEAT_INTERVAL_S": "0.5",
    "NISSA_BUS_POLL_INTERVAL_S": "0.2",
    "NISSA_HOUSEKEEPING_INTERVAL_S": "0.2",
    "NISSA_SNAPSHOT_INTERVAL_S": "0.3",
}

NissaFactory = Callable[..., ServiceProcess]


def nissa_process(
    bus_url: str, prefix: str, data_dir: Path, log_dir: Path, **overrides: str
) -> ServiceProcess:
    """A Nissa process (not started); `overrides` are `NISSA_*` variables. The developer's own
    `NISSA_*`/`ESPER_BUS_*` variables are not passed on."""
    env = {
        **FAST,
        "NISSA_DATA_DIR": str(data_dir),
        "NISSA_INSTANCE": f"nissa-test-{next(_instances)}",
        "NISSA_URZA_URL": "",  # no Urza runs beside these: none is looked for on the default port
        "ESPER_BUS_REDIS_URL": bus_url,
        "ESPER_BUS_PREFIX": prefix,
        **overrides,
    }
    return ServiceProcess(
        "nissa", port_env="NISSA_PORT", env=env, log_dir=log_dir, drop_inherited=_OURS
    )


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"n{next(_instances)}"


@pytest.fixture(scope="module")
def nissa_factory(
    redis_module: RedisServer, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NissaFactory]:
    """`nissa_factory(NISSA_MAX_JOBS="50")`: a running Nissa on the module's Redis and prefix,
    with its own data directory unless `NISSA_DATA_DIR` is given; stopped after the module."""
    started: list[ServiceProcess] = []

    def make(**overrides: str) -> ServiceProcess:
        data = overrides.pop("NISSA_DATA_DIR", None) or str(tmp_path_factory.mktemp("nissa-data"))
        service = nissa_process(
            redis_module.url,
            prefix,
            Path(data),
            tmp_path_factory.mktemp("nissa-log"),
            **overrides,
        )
        started.append(service.start())
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def nissa(nissa_factory: NissaFactory) -> ServiceProcess:
    """This module's Nissa, with the default bounds and the FAST intervals."""
    return nissa_factory()


@pytest.fixture(scope="module")
def bus(redis_module: RedisServer, prefix: str) -> Iterator[Bus]:
    with Bus(redis_module.url, prefix) as client:
        yield client

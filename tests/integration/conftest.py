"""Fixtures of the cross-service tests: the local stack — a real Redis and the services as real
processes (`python -m <service>`) — in a temporary directory, one per test module."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping

import pytest

from esper.stack import LocalStack

CORE = ("urza", "tolaria", "tamiyo")

STACK_ENV: Mapping[str, str] = {
    # Two jobs train at once; each job process on one thread, so two fit two cores.
    "TOLARIA_WORKERS": "2",
    "OMP_NUM_THREADS": "1",
    "TOLARIA_LOG_JSON": "false",
    "URZA_LOG_JSON": "false",
    "TAMIYO_LOG_JSON": "false",
    "NISSA_LOG_JSON": "false",
}
"""What every stack of these tests runs with; a module adds its own (Tamiyo's policy, say)."""


def stack_services() -> list[str]:
    """Urza, Tolaria, Tamiyo, and Nissa once it is installed."""
    return [*CORE, *(["nissa"] if importlib.util.find_spec("nissa") is not None else [])]


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    """Override in a test module to add variables to every service's environment."""
    return {}


@pytest.fixture(scope="module")
def full_stack(
    tmp_path_factory: pytest.TempPathFactory, stack_env: Mapping[str, str]
) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    env = {**STACK_ENV, **stack_env}
    with LocalStack(root, services=stack_services(), env=env) as running:
        yield running

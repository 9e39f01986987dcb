"""Shared fixtures: small real models, a kernel registry + cache, bus clients on real Redis."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch
from torch import nn

import esper
from esper.bus import BusSettings, Producer

# Tests import helper modules that sit beside them (bus_worker, kit_demo_service); pytest runs in
# importlib mode (every package has its own tests/), which does not put this directory on the path.
sys.path.insert(0, str(Path(__file__).parent))


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.layer1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.layer2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.act(self.layer1(x)))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Two intra-op threads on a shared two-core machine make export several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
async def client(bus_settings: BusSettings) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the test's server, for raw stream commands."""
    redis = aioredis.Redis.from_url(bus_settings.redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def producer(bus_settings: BusSettings) -> AsyncIterator[Producer]:
    async with Producer(bus_settings) as p:
        yield p


@pytest.fixture
def registry() -> esper.LocalKernelRegistry:
    return esper.LocalKernelRegistry()


@pytest.fixture
def cache(registry: esper.LocalKernelRegistry) -> esper.KernelCache:
    return esper.KernelCache([registry])


@pytest.fixture
def mlp() -> TinyMLP:
    return TinyMLP()


@pytest.fixture
def cnn() -> TinyCNN:
    return TinyCNN()


pytest_plugins = ["esper.testing.pytest_plugin"]

"""Batched telemetry: full batches, timer flushes, drain on close, bounded while Redis is away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from bus_worker import Ping, Sample, wait_until

from esper.bus import FIELD, BusSettings, Producer
from esper.contracts.envelope import Envelope
from esper.exceptions import ConfigError
from esper.testing import RedisServer
from esper.testing.pytest_plugin import bus_settings_for


def sample(step: int) -> Envelope:
    return Envelope.wrap(Sample(step=step, loss=1.0 / (step + 1)), source="kasmina")


async def steps(client: aioredis.Redis) -> list[int]:
    entries = await client.xrange("esper:telemetry")
    return [Envelope.decode(f[FIELD]).payload["step"] for _, f in entries]


async def test_full_batches_go_out_as_one_pipeline_each(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    settings = bus_settings.model_copy(update={"batch_size": 10, "flush_interval_s": 60.0})
    async with Producer(settings) as producer:
        for step in range(25):
            producer.publish_batched(sample(step))
        batcher = producer.batcher()
        await wait_until(lambda: batcher.stats.published == 20)
        assert batcher.pending == 5  # the rest waits for a full batch or the timer
        assert batcher.stats.batches == 2
        await producer.flush()
        assert batcher.pending == 0 and batcher.stats.published == 25
    assert await steps(client) == list(range(25))


async def test_timer_flushes_a_partial_batch(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    settings = bus_settings.model_copy(update={"batch_size": 1000, "flush_interval_s": 0.05})
    async with Producer(settings) as producer:
        producer.publish_batched(sample(1))
        producer.publish_batched(sample(2))
        await wait_until(lambda: producer.batcher().stats.published == 2, timeout=2)
        assert producer.batcher().stats.batches == 1
    assert await steps(client) == [1, 2]


async def test_close_drains_the_queue(bus_settings: BusSettings, client: aioredis.Redis) -> None:
    settings = bus_settings.model_copy(update={"batch_size": 64, "flush_interval_s": 60.0})
    producer = Producer(settings)
    for step in range(1000):
        producer.publish_batched(sample(step))
    await producer.close()
    assert await steps(client) == list(range(1000))
    assert producer.batcher().stats.dropped == 0


async def test_full_queue_drops_the_oldest_and_counts(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = bus_settings_for(
        server.url, batch_size=5, batch_queue_max=20, flush_interval_s=0.01, retry_timeout_s=20
    )
    producer = Producer(settings)
    server.kill()  # Redis away: the first batch keeps retrying, the queue fills
    for step in range(100):
        producer.publish_batched(sample(step))
        await asyncio.sleep(0)
    batcher = producer.batcher()
    assert batcher.pending <= 20
    assert batcher.stats.dropped_full >= 100 - 20 - 5
    await asyncio.to_thread(server.restart)
    await producer.flush()
    await producer.close()
    client = aioredis.Redis.from_url(server.url)
    got = await steps(client)
    await client.aclose()
    assert got[-20:] == list(range(80, 100)), "the newest messages survive"
    assert len(got) + batcher.stats.dropped == 100
    assert batcher.stats.dropped_unreachable == 0


async def test_undeliverable_batch_is_dropped_after_the_retry_deadline(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = bus_settings_for(server.url, batch_size=4, retry_timeout_s=0.3)
    producer = Producer(settings)
    server.kill()
    for step in range(4):
        producer.publish_batched(sample(step))
    await producer.flush()  # returns: the batch was given up on, not lost silently
    assert producer.batcher().stats.dropped_unreachable == 4
    assert producer.stats.failures == 1
    await producer.close()


async def test_control_messages_are_never_batched(bus_settings: BusSettings) -> None:
    async with Producer(bus_settings) as producer:
        with pytest.raises(ConfigError, match="not lossy"):
            producer.publish_batched(Envelope.wrap(Ping(n=1), source="t"))

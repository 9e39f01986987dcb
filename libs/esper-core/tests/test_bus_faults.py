"""Fault tests against a real redis-server: dead consumers, a crashing Redis, graceful stops.

These are the bus's acceptance criteria: a consumer killed (SIGKILL) in the middle of a handler
loses nothing and its effect happens once; a Redis crash and restart (AOF, appendfsync always)
under a running producer and consumer loses no acknowledged message and needs no help to recover.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from bus_worker import (
    ATTEMPTS,
    EFFECTS,
    GROUP,
    HANDLED_BY,
    Ping,
    make_effect_handler,
    wait_until,
)

from esper.bus import BusSettings, Consumer, Delivery, Producer
from esper.contracts.envelope import Envelope
from esper.exceptions import BusError
from esper.testing import RedisServer
from esper.testing.pytest_plugin import FAST_BUS, bus_settings_for

WORKER = Path(__file__).with_name("bus_worker.py")


def ping(n: int = 0, sleep_s: float = 0.0) -> Envelope:
    return Envelope.wrap(Ping(n=n, sleep_s=sleep_s), source="test")


async def pending(client: aioredis.Redis, stream: str, group: str) -> int:
    return int((await client.xpending(stream, group))["pending"])


async def test_consumer_killed_mid_handler_its_messages_move_and_happen_once(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    settings = bus_settings.model_copy(update={"claim_idle_ms": 500})
    async with Producer(settings) as producer:
        slow = ping(0, sleep_s=120.0)  # the first attempt hangs in the handler until killed
        envelopes = [slow, *(ping(n) for n in range(1, 5))]
        for envelope in envelopes:
            await producer.publish(envelope)
    ids = {e.id for e in envelopes}

    env = {
        **os.environ,
        **{f"ESPER_BUS_{k.upper()}": str(v) for k, v in FAST_BUS.items()},
        "ESPER_BUS_REDIS_URL": settings.redis_url,
        "ESPER_BUS_CLAIM_IDLE_MS": str(settings.claim_idle_ms),
    }
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), "doomed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    survivor = Consumer(
        GROUP, ["control"], settings=settings, name="survivor", handler=make_effect_handler(client)
    )
    try:
        # the worker is inside the slow handler, holding all five entries
        await wait_until(lambda: client.hexists(ATTEMPTS, slow.id), timeout=60)
        async with survivor:
            # While the worker lives, its heartbeat keeps its entries: nothing moves, even
            # though they are older than claim_idle_ms.
            await asyncio.sleep(3 * settings.claim_idle_ms / 1000)
            assert survivor.stats.received == 0
            assert await client.hlen(EFFECTS) == 0

            worker.kill()  # SIGKILL, mid-handler
            assert worker.wait(10) == -9
            await wait_until(lambda: survivor.stats.handled == 5, timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stderr is not None:
            worker.stderr.close()

    effects = {k.decode(): int(v) for k, v in (await client.hgetall(EFFECTS)).items()}
    assert effects == dict.fromkeys(ids, 1), "every effect exactly once"
    handled_by = {v.decode() for v in (await client.hgetall(HANDLED_BY)).values()}
    assert handled_by == {"survivor"}
    assert int(await client.hget(ATTEMPTS, slow.id)) == 2  # killed attempt + the survivor's
    assert survivor.stats.reclaimed == 5 and survivor.stats.duplicates == 0
    assert await pending(client, "esper:control", GROUP) == 0


async def test_live_consumers_keep_their_entries_past_claim_idle(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    """A handler running 4x claim_idle_ms is not taken over by the other consumer."""
    calls: list[str] = []

    async def slow(d: Delivery) -> None:
        calls.append(d.consumer)
        await asyncio.sleep(4 * bus_settings.claim_idle_ms / 1000)

    settings = bus_settings.model_copy(update={"read_count": 1})
    a = Consumer("svc", ["control"], settings=settings, name="a", handler=slow)
    b = Consumer("svc", ["control"], settings=settings, name="b", handler=slow)
    await a.ensure_groups()
    async with a, b:
        async with Producer(settings) as producer:
            await producer.publish(ping(1))
        await wait_until(lambda: a.stats.handled + b.stats.handled == 1, timeout=5)
    assert len(calls) == 1
    assert a.stats.reclaimed == b.stats.reclaimed == 0
    assert await pending(client, "esper:control", "svc") == 0


async def test_redis_crash_and_restart_loses_no_acknowledged_message(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=True)  # appendfsync always
    settings = bus_settings_for(server.url)
    acked: list[str] = []
    handled: list[str] = []

    async def handle(d: Delivery) -> None:
        handled.append(d.envelope.id)

    async def produce(producer: Producer, count: int) -> None:
        for n in range(count):
            envelope = ping(n)
            await producer.publish(envelope)  # returns only once Redis replied
            acked.append(envelope.id)
            await asyncio.sleep(0.002)

    consumer = Consumer("svc", ["control"], settings=settings, handler=handle)
    async with Producer(settings) as producer, consumer:
        task = asyncio.create_task(produce(producer, 600))
        await wait_until(lambda: len(acked) >= 150 and len(handled) >= 100, timeout=10)
        server.kill()  # a crash: no shutdown, no final fsync beyond appendfsync always
        await asyncio.sleep(0.3)
        assert not consumer.connected
        await asyncio.to_thread(server.restart)
        await asyncio.wait_for(task, 30)
        await wait_until(lambda: set(acked) <= set(handled), timeout=20)
        assert consumer.connected

    assert set(handled) == set(acked), "every acknowledged message handled, nothing else"
    assert len(acked) == 600
    assert producer.stats.reconnects >= 1 and consumer.stats.reconnects >= 1
    check = aioredis.Redis.from_url(server.url)
    assert await pending(check, "esper:control", "svc") == 0
    await check.aclose()


async def test_graceful_stop_finishes_the_handler_in_flight(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    async def handle(d: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(d.envelope.id)

    consumer = Consumer("svc", ["control"], settings=bus_settings, handler=handle)
    consumer.start()
    async with Producer(bus_settings) as producer:
        envelope = ping(1)
        await producer.publish(envelope)
    await asyncio.wait_for(started.wait(), 5)
    await consumer.stop()
    assert finished == [envelope.id], "the handler ran to its end"
    assert consumer.stats.handled == 1 and not consumer.running
    assert await pending(client, "esper:control", "svc") == 0, "and its entry was acked"
    await consumer.close()


async def test_stop_hands_unstarted_entries_back_at_once(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    """Entries read in the same batch as the in-flight one are released on stop, so another
    consumer takes them right away instead of waiting claim_idle_ms."""
    settings = bus_settings.model_copy(update={"claim_idle_ms": 5_000, "reclaim_interval_ms": 50})
    started = asyncio.Event()
    by: dict[str, list[int]] = {"first": [], "second": []}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def handle(d: Delivery) -> None:
            assert isinstance(d.message, Ping)
            started.set()
            if name == "first":
                await asyncio.sleep(0.3)
            by[name].append(d.message.n)

        return handle

    first = Consumer("svc", ["control"], settings=settings, name="first", handler=recorder("first"))
    await first.ensure_groups()
    async with Producer(settings) as producer:
        for n in range(3):
            await producer.publish(ping(n))
    first.start()
    await asyncio.wait_for(started.wait(), 5)
    await first.stop()
    t0 = time.monotonic()
    second = Consumer(
        "svc", ["control"], settings=settings, name="second", handler=recorder("second")
    )
    async with second:
        await wait_until(lambda: len(by["second"]) == 2, timeout=2.5)
    assert time.monotonic() - t0 < 2.5 < settings.claim_idle_ms / 1000
    assert by == {"first": [0], "second": [1, 2]}
    assert await pending(client, "esper:control", "svc") == 0
    await first.close()


async def test_stop_while_blocked_in_a_read_returns_promptly(bus_settings: BusSettings) -> None:
    settings = bus_settings.model_copy(update={"block_ms": 1_500, "socket_timeout_s": 3.0})
    consumer = Consumer("svc", ["control"], settings=settings, handler=lambda d: asyncio.sleep(0))
    consumer.start()
    await wait_until(lambda: consumer.connected, timeout=5)
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await consumer.stop()
    assert time.monotonic() - t0 < 0.5
    await consumer.close()


async def test_publish_rides_out_a_short_outage(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=True)
    settings = bus_settings_for(server.url)
    async with Producer(settings) as producer:
        await producer.publish(ping(0))
        server.kill()
        publish = asyncio.create_task(producer.publish(ping(1)))
        await asyncio.sleep(0.3)
        assert not publish.done(), "still retrying while Redis is away"
        await asyncio.to_thread(server.restart)
        entry_id = await asyncio.wait_for(publish, 10)
        assert producer.stats.retries >= 1 and producer.stats.reconnects == 1
    check = aioredis.Redis.from_url(server.url)
    assert (await check.xrevrange("esper:control", count=1))[0][0].decode() == entry_id
    await check.aclose()


async def test_publish_gives_up_with_bus_error_after_the_deadline(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = bus_settings_for(server.url, retry_timeout_s=0.5)
    producer = Producer(settings)
    server.kill()
    t0 = time.monotonic()
    with pytest.raises(BusError, match="unreachable"):
        await producer.publish(ping())
    assert 0.2 < time.monotonic() - t0 < 2.0
    await producer.close()


async def test_consumer_started_before_redis_connects_when_it_comes_up(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    settings = bus_settings_for(server.url)
    server.kill()
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        got.append(d.message.n)

    async with Consumer("svc", ["control"], settings=settings, handler=handle) as consumer:
        await asyncio.sleep(0.3)
        assert consumer.running and not consumer.connected
        await asyncio.to_thread(server.restart)
        async with Producer(settings) as producer:
            await producer.publish(ping(7))
        await wait_until(lambda: got == [7], timeout=10)
    assert consumer.stats.reconnects == 1


async def test_stop_right_after_start_wins(bus_settings: BusSettings) -> None:
    consumer = Consumer(
        "svc", ["control"], settings=bus_settings, handler=lambda d: asyncio.sleep(0)
    )
    consumer.start()
    async with asyncio.timeout(3):
        await consumer.stop()  # inline: the task has not run yet when stop() comes
    assert not consumer.running
    async with consumer:  # and it can be started again afterwards
        await wait_until(lambda: consumer.connected, timeout=3)
    await consumer.close()

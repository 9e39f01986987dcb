"""Test contracts and helpers for the bus tests, and a consumer process for the fault tests.

As a script, it runs one consumer of group `workers` on the `control` topic, configured from the
ESPER_BUS_* environment like a real service, with `effect_handler` as its handler:

    python bus_worker.py <consumer-name>

It records in Redis when each attempt starts and when the effect happens, so a test can SIGKILL
it in the middle of a handler and then count how often the effect really happened.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from esper.bus import BusSettings, Consumer, Delivery
from esper.contracts.envelope import Message, register

GROUP = "workers"
ATTEMPTS = "test:attempts"  # hash envelope id -> handler starts
EFFECTS = "test:effects"  # hash envelope id -> completed effects
HANDLED_BY = "test:handled-by"  # hash envelope id -> consumer that completed it
STARTED = "test:started"  # list of "consumer envelope-id attempt"


@register
class Ping(Message):
    """A control-topic test message. `sleep_s` makes the first attempt's handler slow."""

    TYPE = "test.ping"
    TOPIC = "control"

    n: int = 0
    sleep_s: float = 0.0


@register
class Sample(Message):
    TYPE = "test.sample"
    TOPIC = "telemetry"

    step: int
    loss: float = 0.0


def make_effect_handler(client: aioredis.Redis) -> Callable[[Delivery], object]:
    async def effect_handler(delivery: Delivery) -> None:
        env_id = delivery.envelope.id
        await client.hincrby(ATTEMPTS, env_id, 1)
        await client.rpush(STARTED, f"{delivery.consumer} {env_id} {delivery.attempt}")
        message = delivery.message
        assert isinstance(message, Ping)
        if message.sleep_s and delivery.attempt == 1:
            await asyncio.sleep(message.sleep_s)
        # The effect, keyed by envelope id. A real handler would make it idempotent by that id;
        # here it simply counts, so the test can see how often it happened.
        pipe = client.pipeline(transaction=True)
        pipe.hincrby(EFFECTS, env_id, 1)
        pipe.hset(HANDLED_BY, env_id, delivery.consumer)
        await pipe.execute()

    return effect_handler


async def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll `predicate` (sync or async) until truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def main(name: str) -> None:
    settings = BusSettings()
    client = aioredis.Redis.from_url(settings.redis_url)
    consumer = Consumer(
        GROUP, ["control"], settings=settings, name=name, handler=make_effect_handler(client)
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, consumer.request_stop)
    await consumer.run()
    await consumer.close()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

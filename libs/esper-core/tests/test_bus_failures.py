"""Handler failures, retries, the dead-letter stream and bad input, against a real redis-server."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from bus_worker import Ping, wait_until

from esper.bus import (
    BusSettings,
    Consumer,
    DeadLetter,
    Delivery,
    Producer,
    read_dead_letters,
)
from esper.contracts.envelope import Envelope


def ping(n: int = 0) -> Envelope:
    return Envelope.wrap(Ping(n=n), source="test")


async def pending(client: aioredis.Redis, stream: str = "esper:control", group: str = "svc") -> int:
    info = await client.xpending(stream, group)
    return int(info["pending"])


async def test_failed_handler_is_retried_and_then_succeeds(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    attempts: list[int] = []

    async def flaky(d: Delivery) -> None:
        attempts.append(d.attempt)
        if d.attempt < 3:
            raise RuntimeError(f"transient failure {d.attempt}")

    async with Consumer("svc", ["control"], settings=bus_settings, handler=flaky) as consumer:
        await producer.publish(ping())
        await wait_until(lambda: consumer.stats.handled == 1)
    assert attempts == [1, 2, 3]
    assert consumer.stats.failed == 2 and consumer.stats.dead_lettered == 0
    assert await pending(client) == 0
    assert await client.xlen(bus_settings.dead_letter_stream) == 0


async def test_handler_failing_max_deliveries_times_is_dead_lettered_with_the_error(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    calls: list[int] = []

    async def broken(d: Delivery) -> None:
        calls.append(d.attempt)
        raise ValueError(f"cannot apply decision (attempt {d.attempt})")

    later: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        if d.message.n == 0:
            await broken(d)
        later.append(d.message.n)

    envelope = ping(0)
    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle) as consumer:
        entry_id = await producer.publish(envelope)
        await producer.publish(ping(1))
        await wait_until(lambda: consumer.stats.dead_lettered == 1)
    assert calls == [1, 2, 3]  # max_deliveries = 3 in the test settings
    assert later == [1], "the next message was handled while the bad one waited for retries"
    (record,) = await read_dead_letters(client, bus_settings)
    assert record.stream == "esper:control" and record.entry_id == entry_id
    assert record.envelope == envelope.encode()
    assert record.error_type == "ValueError"
    assert "failed 3 times" in record.error
    assert "cannot apply decision (attempt 3)" in record.error
    assert (record.group, record.attempts, record.envelope_id) == ("svc", 3, envelope.id)
    assert record.message_type == "test.ping" and record.consumer == consumer.name
    assert await pending(client) == 0


async def test_handler_timeout_counts_as_a_failure(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    settings = bus_settings.model_copy(update={"handler_timeout_s": 0.05, "max_deliveries": 2})

    async def hangs(d: Delivery) -> None:
        await asyncio.sleep(30)

    async with Consumer("svc", ["control"], settings=settings, handler=hangs) as consumer:
        await producer.publish(ping())
        await wait_until(lambda: consumer.stats.dead_lettered == 1)
    (record,) = await read_dead_letters(client, settings)
    assert record.error_type == "HandlerTimeout" and record.attempts == 2
    assert consumer.stats.failed == 2


BAD_ENTRIES = {
    "not-json": (b"{this is not json", "MalformedMessageError", "not JSON"),
    "not-utf8": (b"\xff\xfe\x00garbage", "MalformedMessageError", "not JSON"),
    "json-array": (b"[1, 2, 3]", "MalformedMessageError", "not an envelope"),
    "no-envelope-fields": (b'{"id": "x"}', "MalformedMessageError", "not an envelope"),
    "unknown-type": (
        json.dumps({"type": "test.nope", "version": 1, "source": "t", "payload": {}}).encode(),
        "UnknownMessageTypeError",
        "test.nope",
    ),
    "unknown-version": (
        json.dumps(
            {"type": "test.ping", "version": 9, "source": "t", "payload": {"n": 1}}
        ).encode(),
        "UnsupportedVersionError",
        "no schema version 9",
    ),
    "invalid-payload": (
        json.dumps(
            {"type": "test.ping", "version": 1, "source": "t", "payload": {"n": "many"}}
        ).encode(),
        "MessageValidationError",
        "n:",
    ),
    "extra-payload-field": (
        json.dumps(
            {"type": "test.ping", "version": 1, "source": "t", "payload": {"n": 1, "x": 2}}
        ).encode(),
        "MessageValidationError",
        "x:",
    ),
}


async def test_bad_entries_are_dead_lettered_with_the_reason_and_the_consumer_goes_on(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    handled: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        handled.append(d.message.n)

    sent: dict[str, str] = {}
    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle) as consumer:
        for i, (name, (raw, _, _)) in enumerate(BAD_ENTRIES.items()):
            (sent[name],) = await producer.publish_raw([raw], "control")
            await producer.publish(ping(i))
        sent["no-field"] = (await client.xadd("esper:control", {"something": "else"})).decode()
        await producer.publish(ping(99))
        await wait_until(lambda: consumer.stats.dead_lettered == len(BAD_ENTRIES) + 1)
        await wait_until(lambda: len(handled) == len(BAD_ENTRIES) + 1)
    assert handled == [*range(len(BAD_ENTRIES)), 99], "every good message, in order"
    records = {r.entry_id: r for r in await read_dead_letters(client, bus_settings)}
    for name, (raw, error_type, fragment) in BAD_ENTRIES.items():
        record = records[sent[name]]
        assert record.envelope == raw, name  # kept byte for byte
        assert record.error_type == error_type, name
        assert fragment in record.error, (name, record.error)
        assert record.attempts == 1 and record.stream == "esper:control"
    missing = records[sent["no-field"]]
    assert missing.error_type == "MalformedMessageError" and "'envelope'" in missing.error
    assert missing.envelope == b""
    assert consumer.stats.failed == 0
    assert await pending(client) == 0


async def test_dead_letter_records_round_trip(
    client: aioredis.Redis, bus_settings: BusSettings
) -> None:
    record = DeadLetter(
        stream="esper:events",
        entry_id="1-2",
        envelope=b"\x00\xff raw",
        error_type="X",
        error="why",
        group="g",
        consumer="c",
        attempts=4,
        envelope_id="e",
        message_type="t",
    )
    await client.xadd(bus_settings.dead_letter_stream, record.fields())  # type: ignore[arg-type]
    (back,) = await read_dead_letters(client, bus_settings)
    assert back.id
    assert back.fields() == record.fields()


async def test_entry_of_a_dead_consumer_is_dead_lettered_after_max_deliveries(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    """A message that kills every consumer that takes it (here: taken by 'ghost' consumers
    that never ack) is dead-lettered once its delivery count passes max_deliveries, without
    running the handler again."""
    settings = bus_settings.model_copy(update={"max_deliveries": 2})
    consumer = Consumer("svc", ["control"], settings=settings, handler=lambda d: asyncio.sleep(0))
    await consumer.ensure_groups()
    envelope = ping(5)
    entry_id = await producer.publish(envelope)
    await client.xreadgroup("svc", "ghost-1", {"esper:control": ">"}, count=1)
    await client.xclaim("esper:control", "svc", "ghost-2", 0, [entry_id])  # 2nd delivery
    await client.set(settings.error_key("svc", envelope.id), "OOMKilled: ghost-1")
    await client.xclaim(
        "esper:control", "svc", "ghost-2", 0, [entry_id], idle=settings.claim_idle_ms
    )
    async with consumer:
        await wait_until(lambda: consumer.stats.dead_lettered == 1)
    assert consumer.stats.handled == 0 and consumer.stats.reclaimed == 1
    (record,) = await read_dead_letters(client, settings)
    assert record.error_type == "MaxDeliveriesExceeded" and record.attempts == 4
    assert "OOMKilled: ghost-1" in record.error
    assert await pending(client) == 0


async def test_pending_entry_trimmed_away_is_acked_and_counted(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    consumer = Consumer(
        "svc", ["control"], settings=bus_settings, handler=lambda d: asyncio.sleep(0)
    )
    await consumer.ensure_groups()
    for n in range(3):
        await producer.publish(ping(n))
    await client.xreadgroup("svc", "ghost", {"esper:control": ">"}, count=3)
    await client.xtrim("esper:control", maxlen=0, approximate=False)
    await asyncio.sleep(bus_settings.claim_idle_ms / 1000)
    async with consumer:
        await wait_until(lambda: consumer.stats.trimmed == 3)
    assert await pending(client) == 0
    assert consumer.stats.handled == 0


async def test_stream_deleted_under_a_running_consumer_is_recreated(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        got.append(d.message.n)

    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle):
        await producer.publish(ping(1))
        await wait_until(lambda: got == [1])
        await client.delete("esper:control")  # NOGROUP on the next read
        await asyncio.sleep(0.3)
        await producer.publish(ping(2))
        await wait_until(lambda: got == [1, 2])
    assert await client.xinfo_groups("esper:control")


async def test_scripts_flushed_under_a_running_consumer_are_loaded_again(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    """A Redis restarted without persistence (or SCRIPT FLUSH) forgets the Lua scripts."""
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        got.append(d.message.n)

    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle) as consumer:
        await producer.publish(ping(1))
        await wait_until(lambda: got == [1])
        await client.script_flush()
        await producer.publish(ping(2))
        await wait_until(lambda: got == [1, 2])
    assert consumer.stats.errors == 0

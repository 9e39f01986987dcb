"""Producer → stream → consumer group against a real redis-server: the happy paths."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from bus_worker import Ping, Sample, wait_until

from esper.bus import FIELD, BusSettings, Consumer, Delivery, Producer
from esper.contracts import DecisionTaken, DecisionTakenV1
from esper.contracts.envelope import Envelope


def ping(n: int = 0, **kw: object) -> Envelope:
    return Envelope.wrap(Ping(n=n), source="test", **kw)  # type: ignore[arg-type]


async def pending(client: aioredis.Redis, stream: str, group: str) -> int:
    info = await client.xpending(stream, group)
    return int(info["pending"])


async def test_round_trip_delivers_envelope_and_validated_message(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    got: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        got.append(d)

    sent = Envelope.wrap(Ping(n=7), source="tamiyo", job_id="job-1", correlation_id="c-9")
    consumer = Consumer("svc", ["control"], settings=bus_settings, name="c1")
    consumer.register(Ping, handle)
    async with consumer:
        entry_id = await producer.publish(sent)
        await wait_until(lambda: got)
    (d,) = got
    assert d.envelope == sent
    assert d.message == Ping(n=7)
    assert (d.topic, d.stream, d.entry_id) == ("control", "esper:control", entry_id)
    assert (d.attempt, d.group, d.consumer) == (1, "svc", "c1")
    # one field, the envelope's JSON bytes, on {prefix}:{topic}
    ((_, fields),) = await client.xrange("esper:control")
    assert fields == {FIELD: sent.encode()}
    assert consumer.stats.received == consumer.stats.handled == 1
    assert not consumer.running


async def test_ack_after_success_leaves_nothing_pending(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    seen_pending: list[int] = []

    async def handle(d: Delivery) -> None:
        seen_pending.append(await pending(client, d.stream, d.group))

    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle) as consumer:
        for n in range(5):
            await producer.publish(ping(n))
        await wait_until(lambda: consumer.stats.handled == 5)
        assert await pending(client, "esper:control", "svc") == 0
    assert all(p >= 1 for p in seen_pending)  # entry was pending while its handler ran


async def test_order_within_a_stream_is_kept(bus_settings: BusSettings, producer: Producer) -> None:
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        got.append(d.message.n)

    for n in range(100):
        await producer.publish(ping(n))
    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle):
        await wait_until(lambda: len(got) == 100)
    assert got == list(range(100))


async def test_two_consumers_share_a_group_and_each_group_gets_everything(
    bus_settings: BusSettings, producer: Producer
) -> None:
    by_consumer: dict[str, list[str]] = {"a": [], "b": [], "other": []}

    def recorder(key: str):  # type: ignore[no-untyped-def]
        async def handle(d: Delivery) -> None:
            by_consumer[key].append(d.envelope.id)
            await asyncio.sleep(0.002)  # long enough for the other consumer to get a share

        return handle

    settings = bus_settings.model_copy(update={"read_count": 4})
    a = Consumer("svc", ["control"], settings=settings, name="a", handler=recorder("a"))
    b = Consumer("svc", ["control"], settings=settings, name="b", handler=recorder("b"))
    other = Consumer("audit", ["control"], settings=settings, handler=recorder("other"))
    await a.ensure_groups()
    await other.ensure_groups()
    async with a, b, other:
        await asyncio.sleep(0.05)  # b joins
        sent = {(await producer.publish(ping(n)), n) for n in range(200)}
        await wait_until(lambda: len(by_consumer["a"]) + len(by_consumer["b"]) == 200)
        await wait_until(lambda: len(by_consumer["other"]) == 200)
    assert len(sent) == 200
    assert by_consumer["a"] and by_consumer["b"], "both consumers of the group got work"
    assert set(by_consumer["a"]).isdisjoint(by_consumer["b"])
    assert set(by_consumer["a"]) | set(by_consumer["b"]) == set(by_consumer["other"])


async def test_consumer_reads_several_topics_and_dispatches_by_type(
    bus_settings: BusSettings, producer: Producer
) -> None:
    pings: list[int] = []
    samples: list[int] = []

    consumer = Consumer("svc", ["control", "telemetry"], settings=bus_settings)

    @consumer.on("test.ping")
    async def on_ping(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        pings.append(d.message.n)

    @consumer.on(Sample)
    async def on_sample(d: Delivery) -> None:
        assert isinstance(d.message, Sample) and d.topic == "telemetry"
        samples.append(d.message.step)

    async with consumer:
        await producer.publish(ping(1))
        await producer.publish(Envelope.wrap(Sample(step=5), source="kasmina"))
        await wait_until(lambda: pings and samples)
    assert (pings, samples) == ([1], [5])


async def test_an_old_version_is_handed_to_the_handler_upgraded(
    bus_settings: BusSettings, producer: Producer
) -> None:
    got: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        got.append(d)

    # What a producer from before refusal codes sends: event.decision_taken v1, words only.
    old = DecisionTakenV1(
        decision_id="d-1",
        job_id="job-1",
        action="germinate",
        outcome="refused",
        reason="max_seeds reached: the job holds 1 seed(s) and max_seeds is 1",
        layer="2",
    )
    consumer = Consumer("svc", ["events"], settings=bus_settings)
    consumer.register(DecisionTaken, handle)
    async with consumer:
        await producer.publish(Envelope.wrap(old, source="tolaria-old"))
        await wait_until(lambda: got)
    (d,) = got
    assert d.envelope.version == 1
    assert type(d.message) is DecisionTaken and d.message.code == "max_seeds"


async def test_message_without_a_handler_is_acked_and_counted_as_ignored(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    async with Consumer("svc", ["telemetry"], settings=bus_settings) as consumer:
        await producer.publish(Envelope.wrap(Sample(step=1), source="kasmina"))
        await wait_until(lambda: consumer.stats.ignored == 1)
    assert consumer.stats.handled == 0
    assert await pending(client, "esper:telemetry", "svc") == 0


async def test_duplicate_envelope_id_is_handled_once(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    calls: list[str] = []

    async def handle(d: Delivery) -> None:
        calls.append(d.entry_id)

    envelope = ping(3)
    first = await producer.publish(envelope)
    second = await producer.publish(envelope)  # e.g. a producer retry after a lost reply
    await producer.publish(ping(4))
    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle) as consumer:
        await wait_until(lambda: consumer.stats.handled == 2 and consumer.stats.duplicates == 1)
    assert calls[0] == first and second not in calls and len(calls) == 2
    assert await pending(client, "esper:control", "svc") == 0
    # a second group is not affected by the first group's dedupe keys
    calls.clear()
    async with Consumer("other", ["control"], settings=bus_settings, handler=handle) as c2:
        await wait_until(lambda: c2.stats.handled == 2)
    assert c2.stats.duplicates == 1


async def test_duplicate_copies_on_two_consumers_run_the_handler_once(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    """Two copies of one envelope read at the same moment by two consumers: the lease makes the
    second wait, and after the first finishes it is acked as a duplicate, never run."""
    calls: list[str] = []
    started = asyncio.Event()

    async def handle(d: Delivery) -> None:
        calls.append(d.consumer)
        started.set()
        await asyncio.sleep(0.4)

    settings = bus_settings.model_copy(update={"read_count": 1})
    a = Consumer("svc", ["control"], settings=settings, name="a", handler=handle)
    b = Consumer("svc", ["control"], settings=settings, name="b", handler=handle)
    await a.ensure_groups()
    async with a, b:
        await asyncio.sleep(0.05)
        envelope = ping(1)
        await producer.publish(envelope)
        await producer.publish(envelope)
        await wait_until(lambda: a.stats.duplicates + b.stats.duplicates == 1, timeout=5)
        await wait_until(lambda: a.stats.handled + b.stats.handled == 1)
    assert len(calls) == 1
    assert a.stats.deferred + b.stats.deferred >= 1
    assert await pending(client, "esper:control", "svc") == 0


async def test_new_group_reads_messages_published_before_it_existed(
    bus_settings: BusSettings, producer: Producer
) -> None:
    """start_id "0": messages published before the group existed are not lost."""
    await producer.publish(ping(1))
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.message, Ping)
        got.append(d.message.n)

    async with Consumer("late", ["control"], settings=bus_settings, handler=handle):
        await wait_until(lambda: got == [1])
    async with Consumer("tail", ["control"], settings=bus_settings, start_id="$") as tail:
        await asyncio.sleep(0.2)
    assert tail.stats.received == 0


async def test_streams_are_trimmed_to_about_maxlen(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    settings = bus_settings.model_copy(
        update={"maxlen": 1000, "maxlen_overrides": {"telemetry": 50}}
    )
    async with Producer(settings) as p:
        for chunk in range(20):
            await p.publish_many([ping(chunk * 100 + i) for i in range(100)], "control")
            await p.publish_many(
                [Envelope.wrap(Sample(step=i), source="k") for i in range(100)], "telemetry"
            )
    control = await client.xlen("esper:control")
    telemetry = await client.xlen("esper:telemetry")
    # MAXLEN ~ trims whole radix-tree nodes (100 entries each by default): bounded, not exact
    assert 1000 <= control < 1000 + 200
    assert 50 <= telemetry < 50 + 200
    last = await client.xrevrange("esper:control", count=1)
    assert Envelope.decode(last[0][1][FIELD]).message() == Ping(n=1999)


async def test_prefix_isolates_deployments(
    bus_settings: BusSettings, client: aioredis.Redis
) -> None:
    blue = bus_settings.model_copy(update={"prefix": "blue"})
    got: list[str] = []

    async def handle(d: Delivery) -> None:
        got.append(d.stream)

    async with Producer(blue) as p:
        await p.publish(ping(1))
    assert await client.exists("blue:control") and not await client.exists("esper:control")
    async with Consumer("svc", ["control"], settings=bus_settings, handler=handle):
        await asyncio.sleep(0.2)
    async with Consumer("svc", ["control"], settings=blue, handler=handle):
        await wait_until(lambda: got)
    assert got == ["blue:control"]


async def test_dedupe_off_runs_every_copy_and_keeps_no_keys(
    bus_settings: BusSettings, producer: Producer, client: aioredis.Redis
) -> None:
    """For high-rate, naturally idempotent streams (telemetry): no done/lease keys at all."""
    calls: list[str] = []

    async def handle(d: Delivery) -> None:
        calls.append(d.envelope.id)

    envelope = Envelope.wrap(Sample(step=1), source="kasmina")
    await producer.publish(envelope)
    await producer.publish(envelope)
    async with Consumer(
        "metrics", ["telemetry"], settings=bus_settings, handler=handle, dedupe=False
    ) as consumer:
        await wait_until(lambda: consumer.stats.handled == 2)
    assert calls == [envelope.id, envelope.id]
    assert await client.keys("esper:done:*") == [] and await client.keys("esper:lease:*") == []
    assert await pending(client, "esper:telemetry", "metrics") == 0

"""esper.bus: reliable messaging between the Esper services over Redis Streams.

    producer = Producer(settings)
    await producer.publish(Envelope.wrap(decision, source="tamiyo"))      # acked by Redis
    producer.publish_batched(Envelope.wrap(report, source="kasmina"))     # telemetry, lossy

    consumer = Consumer("tamiyo", ["telemetry"], settings=settings)
    consumer.register(TelemetryReport, handle_report)                     # async (Delivery) -> None
    async with consumer:
        ...

Delivery is at least once; handling is once per group within `dedupe_ttl_s` (dedupe by envelope
id). A message whose handler keeps failing, or that cannot be decoded, ends on the dead-letter
stream with the reason. See consumer.py for the life of an entry.
"""

from esper.bus.batcher import BatcherStats, TelemetryBatcher
from esper.bus.connection import CONNECTION_ERRORS, Backoff, connect
from esper.bus.consumer import Consumer
from esper.bus.deadletter import DeadLetter, read_dead_letters
from esper.bus.delivery import ConsumerStats, Delivery, Handler, default_consumer_name
from esper.bus.producer import FIELD, Producer, ProducerStats
from esper.bus.settings import DEFAULT_TOPICS, BusSettings

__all__ = [
    "CONNECTION_ERRORS",
    "DEFAULT_TOPICS",
    "FIELD",
    "Backoff",
    "BatcherStats",
    "BusSettings",
    "Consumer",
    "ConsumerStats",
    "DeadLetter",
    "Delivery",
    "Handler",
    "Producer",
    "ProducerStats",
    "TelemetryBatcher",
    "connect",
    "default_consumer_name",
    "read_dead_letters",
]

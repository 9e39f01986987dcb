"""Publishing envelopes to topic streams.

`publish` returns the stream entry id only after Redis replied to the XADD, so a returned publish
is an acknowledged one (durable across a Redis crash when the server runs `appendfsync always`).
A lost connection is retried with backoff until `retry_timeout_s`, then `BusError`. A retry after
a reply was lost can add the same envelope twice; consumers skip the second copy by envelope id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from esper.bus.batcher import TelemetryBatcher
from esper.bus.connection import CONNECTION_ERRORS, Backoff, Redis, connect
from esper.bus.settings import BusSettings
from esper.contracts.envelope import Envelope
from esper.exceptions import BusError, ConfigError

log = logging.getLogger("esper.bus.producer")

FIELD = b"envelope"
"""Every stream entry has this one field, holding the envelope's JSON bytes."""

T = TypeVar("T")


@dataclass
class ProducerStats:
    published: int = 0
    retries: int = 0
    """Attempts repeated after a lost connection."""
    reconnects: int = 0
    """Publishes that went through after Redis came back."""
    failures: int = 0
    """Publishes given up after retry_timeout_s (BusError raised)."""


class Producer:
    """Publishes envelopes; owns its Redis client unless one is passed in."""

    def __init__(self, settings: BusSettings | None = None, *, redis: Redis | None = None) -> None:
        self.settings = settings or BusSettings()
        self._owns_client = redis is None
        self.redis: Redis = redis if redis is not None else connect(self.settings)
        self.stats = ProducerStats()
        self._batchers: dict[str, TelemetryBatcher] = {}
        self._closed = False

    async def publish(self, envelope: Envelope, topic: str | None = None) -> str:
        """XADD the envelope to its topic (default: the contract's topic); the entry id."""
        ids = await self.publish_raw([envelope.encode()], topic or envelope.topic)
        return ids[0]

    async def publish_many(self, envelopes: Sequence[Envelope], topic: str) -> list[str]:
        """Publish to one topic in one pipelined round trip (not a transaction: a retry after a
        half-delivered batch may duplicate some entries, which consumers skip by envelope id)."""
        return await self.publish_raw([e.encode() for e in envelopes], topic)

    async def publish_raw(self, payloads: Sequence[bytes], topic: str) -> list[str]:
        """XADD already-encoded envelopes. Raw bytes are accepted as they are: this is also how
        tests put malformed entries on a stream."""
        if self._closed:
            raise BusError("producer is closed")
        if not payloads:
            return []
        stream = self.settings.stream(topic)
        maxlen = self.settings.maxlen_for(topic)

        async def send() -> list[str]:
            if len(payloads) == 1:  # the common case: no pipeline object to build and reset
                reply = await self.redis.xadd(
                    stream, {FIELD: payloads[0]}, maxlen=maxlen, approximate=True
                )
                return [reply.decode() if isinstance(reply, bytes) else str(reply)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.xadd(stream, {FIELD: payload}, maxlen=maxlen, approximate=True)
                replies = await pipe.execute()
            return [r.decode() if isinstance(r, bytes) else str(r) for r in replies]

        ids = await self._retrying(send, f"publish to {stream}")
        self.stats.published += len(ids)
        return ids

    async def _retrying(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        deadline = time.monotonic() + self.settings.retry_timeout_s
        backoff = Backoff.from_settings(self.settings)
        while True:
            try:
                result = await op()
            except CONNECTION_ERRORS as err:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    self.stats.failures += 1
                    raise BusError(
                        f"{what}: Redis unreachable for {self.settings.retry_timeout_s} s "
                        f"({type(err).__name__}: {err})"
                    ) from err
                if backoff.attempts == 1:
                    log.warning("%s failed (%s: %s); retrying", what, type(err).__name__, err)
                self.stats.retries += 1
                await asyncio.sleep(delay)
            else:
                if backoff.attempts:
                    self.stats.reconnects += 1
                    log.info("%s succeeded after %d retries", what, backoff.attempts)
                return result

    def batcher(self, topic: str = "telemetry") -> TelemetryBatcher:
        """The batcher of a lossy topic, created on first use."""
        if topic not in self.settings.lossy_topics:
            raise ConfigError(
                f"topic {topic!r} is not lossy and is never batched; publish it with publish() "
                f"(lossy topics: {', '.join(self.settings.lossy_topics)})"
            )
        if topic not in self._batchers:
            self._batchers[topic] = TelemetryBatcher(self, topic)
        return self._batchers[topic]

    def publish_batched(self, envelope: Envelope, topic: str | None = None) -> None:
        """Queue a lossy message (telemetry) for the next batch; never blocks, never raises on a
        Redis outage. When the queue is full the oldest queued message is dropped and counted."""
        self.batcher(topic or envelope.topic).put(envelope)

    async def flush(self) -> None:
        """Wait until every message queued by publish_batched so far is published or dropped."""
        for batcher in list(self._batchers.values()):
            await batcher.flush()

    async def close(self) -> None:
        """Drain the batchers, then close the client if this producer created it."""
        if self._closed:
            return
        for batcher in list(self._batchers.values()):
            await batcher.close()
        self._closed = True
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

"""Batched publishing for lossy, high-rate topics (telemetry).

`put()` is synchronous and O(1): the training loop never waits on Redis. A background task sends
the queue as one pipelined XADD batch when `batch_size` messages are waiting or the oldest has
waited `flush_interval_s`. The queue is bounded (`batch_queue_max`): when Redis is slow or away,
the *oldest* queued message is dropped and counted, because fresh telemetry is worth more than
stale telemetry and memory must stay bounded. A batch that cannot be delivered within
`retry_timeout_s` is dropped and counted too. Control messages and events never come here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esper.contracts.envelope import Envelope
from esper.exceptions import BusError

if TYPE_CHECKING:
    from esper.bus.producer import Producer

log = logging.getLogger("esper.bus.batcher")


@dataclass
class BatcherStats:
    queued: int = 0
    published: int = 0
    batches: int = 0
    dropped_full: int = 0
    """Oldest messages pushed out of a full queue."""
    dropped_unreachable: int = 0
    """Messages of batches Redis did not take within retry_timeout_s."""

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unreachable


class TelemetryBatcher:
    """One topic's queue and the task that flushes it. Create it through `Producer.batcher()`."""

    def __init__(self, producer: Producer, topic: str) -> None:
        settings = producer.settings
        settings.stream(topic)  # refuse an unknown topic now, not in the background task
        self.producer = producer
        self.topic = topic
        self.batch_size = settings.batch_size
        self.flush_interval_s = settings.flush_interval_s
        self.max_queue = settings.batch_queue_max
        self.stats = BatcherStats()
        # (sequence number, time queued, encoded envelope); sequence numbers make flush() exact
        self._queue: deque[tuple[int, float, bytes]] = deque()
        self._seq = 0
        self._in_flight_first: int | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._flush_to = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def put(self, envelope: Envelope) -> None:
        """Queue one message (never blocks; drops the oldest queued message when full)."""
        if self._closing:
            raise BusError(f"batcher for {self.topic!r} is closed")
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.stats.dropped_full += 1
            if self.stats.dropped_full == 1 or self.stats.dropped_full % 1000 == 0:
                log.warning(
                    "telemetry queue for %s full (%d): dropped %d oldest so far",
                    self.topic,
                    self.max_queue,
                    self.stats.dropped_full,
                )
        self._seq += 1
        self._queue.append((self._seq, time.monotonic(), envelope.encode()))
        self.stats.queued += 1
        if len(self._queue) >= self.batch_size or len(self._queue) == 1:
            self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"esper-bus-batcher-{self.topic}"
            )

    @property
    def pending(self) -> int:
        """Messages queued and not yet sent."""
        return len(self._queue)

    async def flush(self) -> None:
        """Send everything queued before this call; return once it is published or dropped."""
        target = self._seq
        self._flush_to = max(self._flush_to, target)
        self._wake.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._settled(target) or self._task_dead())

    async def close(self) -> None:
        """Stop taking messages, send what is queued, stop the task."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    def _settled(self, target: int) -> bool:
        first_queued = self._queue[0][0] if self._queue else None
        queued_ok = first_queued is None or first_queued > target
        flight_ok = self._in_flight_first is None or self._in_flight_first > target
        return queued_ok and flight_ok

    def _task_dead(self) -> bool:
        return self._task is not None and self._task.done()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                urgent = (
                    self._closing
                    or len(self._queue) >= self.batch_size
                    or self._queue[0][0] <= self._flush_to
                )
                if not urgent:
                    due = self._queue[0][1] + self.flush_interval_s
                    wait = due - time.monotonic()
                    if wait > 0:
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), wait)
                        continue
                await self._send_one_batch()
        finally:
            await self._notify()

    async def _send_one_batch(self) -> None:
        count = min(self.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        self._in_flight_first = batch[0][0]
        try:
            await self.producer.publish_raw([item[2] for item in batch], self.topic)
        except BusError as err:
            self.stats.dropped_unreachable += count
            log.warning("dropped a telemetry batch of %d for %s: %s", count, self.topic, err)
            if self._closing:  # do not spend retry_timeout_s again on every remaining batch
                self.stats.dropped_unreachable += len(self._queue)
                self._queue.clear()
        except Exception:
            self.stats.dropped_unreachable += count
            log.exception("dropped a telemetry batch of %d for %s", count, self.topic)
        else:
            self.stats.published += count
            self.stats.batches += 1
        finally:
            self._in_flight_first = None
            await self._notify()

"""Every service instance says it is alive on the health topic, every `interval_s` seconds.

The beat carries the readiness checks' outcome: `ok` when all pass, `degraded` otherwise. A beat
that cannot be published is logged and retried on the next tick; it never takes the service down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from esper.bus.producer import Producer
from esper.contracts.api import Check
from esper.contracts.envelope import Envelope
from esper.contracts.health import Heartbeat
from esper.service.loops import Periodic

log = logging.getLogger("esper.service.heartbeat")

Checks = Callable[[], Awaitable[dict[str, Check]]]


class HeartbeatPublisher:
    def __init__(
        self, producer: Producer, service: str, instance: str, interval_s: float, checks: Checks
    ) -> None:
        self.producer = producer
        self.service = service
        self.instance = instance
        self.interval_s = interval_s
        self.checks = checks
        self.started_at = time.time()
        self.sent = 0
        self._loop = Periodic("heartbeat", interval_s, self.beat, logger=log)

    async def beat(self) -> None:
        results = await self.checks()
        healthy = all(result is True for result in results.values())
        details: dict[str, bool | int | float | str | None] = {
            name: result if isinstance(result, bool) else str(result)[:2000]
            for name, result in results.items()
        }
        beat = Heartbeat(
            service=self.service,
            instance=self.instance,
            status="ok" if healthy else "degraded",
            started_at=self.started_at,
            interval_s=self.interval_s,
            details=details,
        )
        # A beat is worth nothing late: publish once, no retry loop behind a dead Redis.
        await asyncio.wait_for(
            self.producer.publish(Envelope.wrap(beat, source=self.service)),
            timeout=self.interval_s,
        )
        self.sent += 1

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

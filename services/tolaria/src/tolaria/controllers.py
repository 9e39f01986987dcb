"""Whether a controller is there to answer decision points: asked by job processes and by the
API for external runs, before either waits for an answer."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from esper.bus import FIELD, BusSettings
from esper.contracts import Envelope, Heartbeat

CONTROLLER = "tamiyo"
"""The service whose heartbeat says a controller is there to answer decision points."""
HEALTH_PAGE = 200
"""Heartbeats read at a time, newest first, when looking for the controller's."""
HEALTH_WINDOW_S = 60.0
"""How far back the controller's beat is looked for: every job beats on the same topic, so the
look is bounded by time, not by a count a busy stack would outgrow."""


async def controller_beating(redis: aioredis.Redis, bus: BusSettings) -> bool:
    """Whether the controller's latest beat on the health topic is within three of its
    intervals and not `down`."""
    stream = bus.stream("health")
    now = time.time()
    oldest = f"{int((now - HEALTH_WINDOW_S) * 1000)}-0"
    newest: str | bytes = "+"
    while True:
        entries = await redis.xrevrange(stream, max=newest, min=oldest, count=HEALTH_PAGE)
        for _, fields in entries or []:
            beat = _controller_beat(fields)
            if beat is not None:  # its latest beat decides
                envelope, heartbeat = beat
                return heartbeat.status != "down" and (
                    now - envelope.ts <= 3 * heartbeat.interval_s
                )
        if not entries or len(entries) < HEALTH_PAGE:
            return False
        last_id = entries[-1][0]
        newest = b"(" + last_id if isinstance(last_id, bytes) else f"({last_id}"


def _controller_beat(fields: Any) -> tuple[Envelope, Heartbeat] | None:
    """The controller's heartbeat in a health-stream entry, if it is one."""
    try:
        envelope = Envelope.decode((fields or {})[FIELD])
        beat = envelope.message()
    except Exception:  # not ours to judge here: the health topic's consumers report it
        return None
    if isinstance(beat, Heartbeat) and beat.service == CONTROLLER:
        return envelope, beat
    return None

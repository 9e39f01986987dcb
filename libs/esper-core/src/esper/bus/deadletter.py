"""The dead-letter stream: entries the bus gave up on, with everything needed to judge or replay.

One stream per prefix (`{prefix}:dead-letter`), trimmed like the others. A record keeps the raw
envelope bytes exactly as they were on the source stream (even when they are not JSON), where
they came from, why they failed and how often they were tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from esper.bus.connection import Redis
from esper.bus.settings import BusSettings


@dataclass(frozen=True)
class DeadLetter:
    stream: str
    entry_id: str
    envelope: bytes
    """The raw bytes of the source entry's `envelope` field (empty when it had none)."""
    error_type: str
    error: str
    group: str
    consumer: str
    attempts: int
    envelope_id: str = ""
    message_type: str = ""
    ts: float = field(default_factory=time.time)
    id: str = ""
    """This record's id on the dead-letter stream (set when read back)."""

    def fields(self) -> dict[str, bytes | str | int | float]:
        return {
            "stream": self.stream,
            "entry_id": self.entry_id,
            "envelope": self.envelope,
            "error_type": self.error_type,
            "error": self.error,
            "group": self.group,
            "consumer": self.consumer,
            "attempts": self.attempts,
            "envelope_id": self.envelope_id,
            "message_type": self.message_type,
            "ts": self.ts,
        }

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict[Any, Any]) -> DeadLetter:
        def text(name: str) -> str:
            value = fields.get(name.encode(), fields.get(name, b""))
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

        raw = fields.get(b"envelope", fields.get("envelope", b""))
        return cls(
            stream=text("stream"),
            entry_id=text("entry_id"),
            envelope=raw if isinstance(raw, bytes) else str(raw).encode(),
            error_type=text("error_type"),
            error=text("error"),
            group=text("group"),
            consumer=text("consumer"),
            attempts=int(text("attempts") or 0),
            envelope_id=text("envelope_id"),
            message_type=text("message_type"),
            ts=float(text("ts") or 0.0),
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        )


async def read_dead_letters(
    redis: Redis, settings: BusSettings, *, start: str = "-", count: int = 1000
) -> list[DeadLetter]:
    """Dead-letter records from `start` on, oldest first (XRANGE; reading does not remove them)."""
    entries: Any = await redis.xrange(settings.dead_letter_stream, min=start, max="+", count=count)
    return [DeadLetter.from_entry(entry_id, fields) for entry_id, fields in entries or []]

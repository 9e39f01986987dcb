"""What a handler receives, and what a consumer counts (exported as metrics by the services)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from esper.contracts.envelope import Envelope, Message


@dataclass(frozen=True)
class Delivery:
    """What a handler gets. Make side effects idempotent by `envelope.id`."""

    envelope: Envelope
    message: Message
    """The payload, validated against its contract (and upgraded: `Envelope.current`)."""
    topic: str
    stream: str
    entry_id: str
    attempt: int
    """1 on first delivery; higher when retried after a failure or a consumer's death."""
    group: str
    consumer: str


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass
class ConsumerStats:
    received: int = 0
    """Entries delivered to this consumer, read or reclaimed."""
    handled: int = 0
    duplicates: int = 0
    failed: int = 0
    """Handler exceptions and timeouts."""
    dead_lettered: int = 0
    reclaimed: int = 0
    reconnects: int = 0
    """Times this consumer got Redis back after losing it."""
    ignored: int = 0
    """Valid messages of a type with no handler here: acked, not handled."""
    deferred: int = 0
    """Copies left pending because another consumer was running the same envelope."""
    lost_ownership: int = 0
    """Entries claimed by another consumer (or acked) before we started them."""
    trimmed: int = 0
    """Pending entries whose data the stream trim removed before anyone handled them."""
    errors: int = 0
    """Unexpected errors in the consume loop (logged with a traceback; the loop goes on)."""


def default_consumer_name() -> str:
    """host-pid-random: unique per process, and readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

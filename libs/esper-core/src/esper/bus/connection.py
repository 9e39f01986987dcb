"""The Redis client the bus uses, the errors that mean "Redis went away", and the backoff.

redis-py retries failed commands on its own by default; the bus turns that off so there is exactly
one retry policy (ours): it knows which operations are safe to repeat and how long to keep trying.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from esper._backoff import Backoff as SharedBackoff
from esper.bus.settings import BusSettings

#: A lost or refused connection, a socket timeout, or a server still loading its AOF
#: (`BusyLoadingError` is a ConnectionError). Anything else from Redis is a bug or bad input.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)

Redis = aioredis.Redis


def connect(settings: BusSettings, **overrides: Any) -> aioredis.Redis:
    """An asyncio client for `settings.redis_url` with the bus's timeouts and no hidden retries.

    Returned values are bytes (no decode_responses): envelopes are stored as raw JSON bytes so a
    payload that is not valid UTF-8 still reaches the dead-letter stream unchanged.
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    options.update(overrides)
    client: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url, **options)
    return client


class Backoff(SharedBackoff):
    """The bus's reconnect and retry backoff: exponential between `low` and `high` seconds with
    jitter, never sooner than `low`; `reset()` on success.

    Jitter keeps a fleet of consumers from reconnecting in lockstep after Redis comes back.
    """

    def __init__(self, low: float, high: float) -> None:
        super().__init__(low, high, floor_s=low)

    @classmethod
    def from_settings(cls, settings: BusSettings) -> Backoff:
        return cls(settings.reconnect_backoff_min_s, settings.reconnect_backoff_max_s)

"""Bus configuration: one prefix, topic names, stream bounds and every timing the bus relies on.

Each service reads it from the environment (`ESPER_BUS_REDIS_URL`, `ESPER_BUS_PREFIX`, ...), so
two deployments can share one Redis under different prefixes and tests can shrink the timings.
The validators refuse combinations that would break a guarantee instead of degrading quietly:
a blocking read as long as the socket timeout would make every idle read look like a dead server.
"""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.exceptions import ConfigError

DEFAULT_TOPICS = ("telemetry", "control", "health", "events", "jobs")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: Headroom between a blocking read's end and the client's socket timeout, so a read that
#: returns on time is never mistaken for a dead connection.
BLOCK_HEADROOM_MS = 100


class BusSettings(BaseSettings):
    """Settings of producers and consumers. Durations carry their unit in the name."""

    model_config = SettingsConfigDict(env_prefix="ESPER_BUS_", extra="ignore", frozen=True)

    redis_url: str = "redis://localhost:6379/0"
    prefix: str = Field(default="esper", min_length=1, max_length=64)
    topics: tuple[str, ...] = DEFAULT_TOPICS
    dead_letter_topic: str = "dead-letter"
    lossy_topics: tuple[str, ...] = ("telemetry",)
    """Topics that may be published through the batcher, which drops the oldest when full."""

    maxlen: int = Field(default=100_000, ge=1)
    """Approximate bound per stream (`XADD MAXLEN ~`); entries trimmed while pending are lost."""
    maxlen_overrides: dict[str, int] = Field(default_factory=dict)

    socket_timeout_s: float = Field(default=5.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    block_ms: int = Field(default=1_000, ge=1)
    read_count: int = Field(default=32, ge=1)

    claim_idle_ms: int = Field(default=10_000, ge=50)
    """An entry idle this long is claimed by another consumer: its owner died or its handler failed.
    Live consumers keep their held entries fresh (every third of this), so it can be short."""
    reclaim_interval_ms: int = Field(default=1_000, ge=10)
    max_deliveries: int = Field(default=5, ge=1)
    handler_timeout_s: float | None = Field(default=60.0, gt=0)
    dedupe_ttl_s: int = Field(default=3_600, ge=1)

    reconnect_backoff_min_s: float = Field(default=0.05, gt=0)
    reconnect_backoff_max_s: float = Field(default=2.0, gt=0)
    retry_timeout_s: float = Field(default=30.0, gt=0)
    """How long a publish (or a consumer's ack after a successful handler) keeps retrying."""

    batch_size: int = Field(default=256, ge=1)
    flush_interval_s: float = Field(default=0.05, gt=0)
    batch_queue_max: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.block_ms + BLOCK_HEADROOM_MS > self.socket_timeout_s * 1000:
            raise ValueError(
                f"block_ms ({self.block_ms}) must be shorter than socket_timeout_s "
                f"({self.socket_timeout_s} s) by at least {BLOCK_HEADROOM_MS} ms, or every idle "
                "blocking read would time out like a dead server"
            )
        if self.reconnect_backoff_min_s > self.reconnect_backoff_max_s:
            raise ValueError("reconnect_backoff_min_s must not exceed reconnect_backoff_max_s")
        for name in (self.prefix, *self.topics, self.dead_letter_topic):
            if not _NAME.match(name):
                raise ValueError(f"bus name {name!r} may use only letters, digits, '_', '.', '-'")
        if len(set(self.topics)) != len(self.topics) or self.dead_letter_topic in self.topics:
            raise ValueError("topics must be distinct and must not include the dead-letter topic")
        for topic in (*self.lossy_topics, *self.maxlen_overrides):
            if topic not in self.topics and topic != self.dead_letter_topic:
                raise ValueError(f"unknown topic {topic!r} (topics: {', '.join(self.topics)})")
        if any(n < 1 for n in self.maxlen_overrides.values()):
            raise ValueError("maxlen_overrides values must be >= 1")
        return self

    def stream(self, topic: str) -> str:
        """The stream key of a topic: `{prefix}:{topic}`. Unknown topics are refused."""
        if topic not in self.topics and topic != self.dead_letter_topic:
            raise ConfigError(
                f"unknown topic {topic!r}; configured topics: {', '.join(self.topics)}"
            )
        return f"{self.prefix}:{topic}"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.prefix}:{self.dead_letter_topic}"

    def maxlen_for(self, topic: str) -> int:
        return self.maxlen_overrides.get(topic, self.maxlen)

    def done_key(self, group: str, envelope_id: str) -> str:
        """Set once a group handled an envelope; duplicates within `dedupe_ttl_s` are skipped."""
        return f"{self.prefix}:done:{group}:{envelope_id}"

    def lease_key(self, group: str, envelope_id: str) -> str:
        """Held while a consumer runs the handler, so a duplicate entry waits instead of racing."""
        return f"{self.prefix}:lease:{group}:{envelope_id}"

    def error_key(self, group: str, envelope_id: str) -> str:
        """The last handler error, kept for the dead-letter record of a later attempt."""
        return f"{self.prefix}:error:{group}:{envelope_id}"

"""Health: each service instance says it is alive, every `interval_s` seconds.

Nissa aggregates these; an instance is counted as down when no heartbeat arrived for a few
intervals, so the interval travels with the beat instead of being a guess on the reading side.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from esper.contracts.envelope import Message, register
from esper.contracts.vocabulary import Detail, HealthState, Identifier, Key, ServiceName, Timestamp


@register
class Heartbeat(Message):
    """One instance of one service: its status now, and since when it has been running."""

    TYPE: ClassVar[str] = "health.heartbeat"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "health"

    service: ServiceName
    instance: Identifier
    status: HealthState
    started_at: Timestamp
    interval_s: float = Field(gt=0.0, le=3600.0)
    details: dict[Key, Detail] = Field(default_factory=dict, max_length=64)

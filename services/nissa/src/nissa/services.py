"""Service health from heartbeats: every service instance beats on the health topic every
`interval_s`; one that missed `down_after_beats` beats (or said `down`) is down, and a service is
up while at least one of its instances is.

A beat's time is its envelope's `ts`, capped at the moment it arrived: a beat replayed from the
stream long after it was sent says nothing about now, and a sender's clock running ahead must not
keep an instance up after it died.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from esper.contracts import Heartbeat


@dataclass
class Instance:
    instance: str
    status: str
    last_beat: float
    interval_s: float
    started_at: float
    details: dict[str, Any]

    def up(self, now: float, down_after_beats: int) -> bool:
        fresh = now - self.last_beat <= down_after_beats * self.interval_s
        return fresh and self.status != "down"


@dataclass
class Service:
    name: str
    last_beat: float = 0.0
    instances: OrderedDict[str, Instance] = field(default_factory=OrderedDict)


class InstanceView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance: str
    up: bool
    status: str
    last_beat: float
    age_s: float
    interval_s: float
    started_at: float
    details: dict[str, Any]


class ServiceView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str
    up: bool
    last_beat: float
    instances_up: int
    instances: list[InstanceView]


class ServicesView(BaseModel):
    """`GET /health/services`."""

    model_config = ConfigDict(extra="forbid")

    down_after_beats: int
    services: list[ServiceView]


class ServiceHealth:
    """Bounded: at most `max_services` services (a new one past that is refused, so a flood of
    made-up names cannot push a real service's series out) and `max_instances` instances each
    (the longest-silent instance makes room); instances silent for `instance_retention_s` are
    forgotten, while their service stays (and reads down)."""

    def __init__(
        self,
        *,
        down_after_beats: int,
        max_services: int,
        max_instances: int,
        instance_retention_s: float,
    ) -> None:
        self.down_after_beats = down_after_beats
        self.max_services = max_services
        self.max_instances = max_instances
        self.instance_retention_s = instance_retention_s
        self.services: dict[str, Service] = {}
        self.refused = 0

    def beat(self, beat: Heartbeat, ts: float) -> bool:
        """Record a beat sent at `ts`; False when it was refused (too many services)."""
        service = self.services.get(beat.service)
        if service is None:
            if len(self.services) >= self.max_services:
                self.refused += 1
                return False
            service = self.services[beat.service] = Service(beat.service)
        known = service.instances.get(beat.instance)
        if known is not None and ts < known.last_beat:
            return True  # an older beat delivered late
        service.instances[beat.instance] = Instance(
            instance=beat.instance,
            status=beat.status,
            last_beat=ts,
            interval_s=beat.interval_s,
            started_at=beat.started_at,
            details=dict(beat.details),
        )
        service.instances.move_to_end(beat.instance)
        service.last_beat = max(service.last_beat, ts)
        while len(service.instances) > self.max_instances:
            service.instances.popitem(last=False)
        return True

    def prune(self, now: float) -> None:
        for service in self.services.values():
            for name in [
                n
                for n, i in service.instances.items()
                if now - i.last_beat > self.instance_retention_s
            ]:
                del service.instances[name]

    def view(self, now: float) -> ServicesView:
        services = []
        for service in sorted(self.services.values(), key=lambda s: s.name):
            instances = [
                InstanceView(
                    instance=i.instance,
                    up=i.up(now, self.down_after_beats),
                    status=i.status,
                    last_beat=i.last_beat,
                    age_s=round(max(0.0, now - i.last_beat), 3),
                    interval_s=i.interval_s,
                    started_at=i.started_at,
                    details=i.details,
                )
                for i in service.instances.values()
            ]
            alive = sum(i.up for i in instances)
            services.append(
                ServiceView(
                    service=service.name,
                    up=alive > 0,
                    last_beat=service.last_beat,
                    instances_up=alive,
                    instances=instances,
                )
            )
        return ServicesView(down_after_beats=self.down_after_beats, services=services)

"""Helpers of Tamiyo's tests (imported by name: conftest puts this directory on the path).

They build real contract messages — TelemetryReport, SeedTransition, DecisionTaken — the way a
Tolaria job would send them, so the tests feed Tamiyo what it gets in production.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from esper.bus import FIELD, BusSettings, Delivery, Producer, connect
from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionTaken,
    Envelope,
    JobStatusChanged,
    LayerStats,
    Message,
    RefusalCode,
    SeedStats,
    SeedTransition,
    TelemetryReport,
    TelemetryReportV1,
    TelemetryReportV2,
)
from esper.policy import tracking
from esper.policy.catalogue import builtin_catalogue
from esper.policy.config import PolicyConfig
from esper.policy.models import JobState
from esper.policy.policy import Context, HeuristicPolicy, Proposal
from tamiyo.catalogue import Catalogue
from tamiyo.controller import Controller, build_decision
from tamiyo.settings import TamiyoSettings
from tamiyo.store import TamiyoStore

TOKEN = "tamiyo-test-token"
LAYERS = ("0", "2", "4")
STEPS_PER_EPOCH = 10


def layer(
    name: str, grad: float | None = 0.1, variance: float | None = 0.5, dead: float = 0.0
) -> LayerStats:
    return LayerStats(
        layer=name,
        activation_mean=0.0,
        activation_variance=variance,
        dead_fraction=dead,
        grad_norm=grad,
    )


def default_layers(grads: Sequence[float | None] = (0.2, 0.5, 0.9)) -> list[LayerStats]:
    """Three layers; by default the output layer has the largest gradient (as it usually
    does) and layer "2" the largest of the others."""
    return [layer(n, g) for n, g in zip(LAYERS, grads, strict=True)]


def report(
    job_id: str,
    epoch: int,
    val_loss: float | None = 0.69,
    *,
    kind: str = "epoch",
    step: int | None = None,
    layers: Iterable[LayerStats] | None = None,
    seeds: Iterable[SeedStats] = (),
    val_accuracy: float | None = 0.5,
    point: bool = False,
    answers: Iterable[DecisionTaken] = (),
    train_loss: float | None = None,
) -> TelemetryReport:
    """A report; `point`: a decision point (the job waits for the answer), carrying the job's
    `answers` to the decisions it executed since its previous report."""
    return TelemetryReport(
        job_id=job_id,
        epoch=epoch,
        step=step if step is not None else (epoch + 1) * STEPS_PER_EPOCH,
        kind=kind,  # type: ignore[arg-type]
        train_loss=train_loss,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        layers=list(default_layers() if layers is None else layers),
        seeds=list(seeds),
        decision_point=point,
        answers=list(answers),
    )


def on_the_wire(message: Message) -> Message:
    """What a job sends: a report that asks nothing and carries no answers goes out as a v1
    report — from a job before decision points, the only report Tamiyo decides on unasked (a
    v2 report that asks nothing is recorded only). Everything else as it is."""
    if isinstance(message, TelemetryReport) and not message.decision_point and not message.answers:
        return as_v1(message)
    return message


V3_ONLY: dict[str, Any] = {"layers": {"__all__": {"next_layer", "growth_gain", "kind"}}}
"""What a v3 report has that older ones lack: each layer's `next_layer`, `kind`, `growth_gain`."""


def as_v1(report: TelemetryReport) -> TelemetryReportV1:
    """`report` as a job from before decision points sent it: without the fields v2 and v3
    added (decision points; each layer's `next_layer` and `growth_gain`)."""
    exclude = {**V3_ONLY, "decision_point": True, "answers": True}
    return TelemetryReportV1(**report.model_dump(exclude=exclude))


def as_v2(report: TelemetryReport) -> TelemetryReportV2:
    """`report` as a job from before widening sent it: its layers without the v3 fields."""
    return TelemetryReportV2(**report.model_dump(exclude=V3_ONLY))


def seed(
    layer_name: str = "2",
    index: int = 0,
    *,
    alpha: float = 1.0,
    contribution: float | None = None,
    state: str = "ACTIVE",
    kernel_id: str = "krn_" + "a" * 24,
) -> SeedStats:
    return SeedStats(
        layer=layer_name,
        seed=index,
        state=state,  # type: ignore[arg-type]
        alpha=alpha,
        kernel_id=kernel_id,
        contribution=contribution,
    )


def taken(
    job_id: str,
    decision_id: str,
    outcome: str = "applied",
    *,
    action: str = "germinate",
    layer_name: str = "2",
    slot: int | None = 0,
    reason: str = "germinated seed 0",
    code: RefusalCode | None = None,
) -> DecisionTaken:
    return DecisionTaken(
        decision_id=decision_id,
        job_id=job_id,
        action=action,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        code=code,
        reason=reason,
        layer=layer_name,
        seed=slot,
    )


def transition(
    job_id: str, layer_name: str, index: int, from_state: str, to_state: str, step: int
) -> SeedTransition:
    return SeedTransition(
        job_id=job_id,
        layer=layer_name,
        seed=index,
        from_state=from_state,  # type: ignore[arg-type]
        to_state=to_state,  # type: ignore[arg-type]
        reason="test",
        kernel_id="krn_" + "a" * 24,
        step=step,
    )


def running(job_id: str) -> JobStatusChanged:
    return JobStatusChanged(job_id=job_id, status="RUNNING", previous="PENDING")


class Driver:
    """Runs the bookkeeping and the heuristic policy on one job's state, as the controller does,
    without Redis: the pure half of Tamiyo."""

    def __init__(
        self, config: PolicyConfig | None = None, job_id: str = "job-1", **kw: Any
    ) -> None:
        self.config = config or PolicyConfig(**kw)
        self.state: JobState = tracking.new_state(job_id)
        self.policy = HeuristicPolicy()
        self.catalogue = builtin_catalogue()
        self.job_id = job_id
        self.counter = 0

    def feed(self, message: TelemetryReport) -> list[Proposal]:
        if not tracking.ingest_report(self.state, message, self.config, {}):
            return []
        if message.kind != "epoch":
            return []
        proposals = self.policy.on_report(self.state, message, Context(self.config, self.catalogue))
        for proposal in proposals:
            self.register(proposal)
        return proposals

    def event(self, message: Any) -> bool:
        return tracking.ingest_event(self.state, message, self.config)

    def register(self, proposal: Proposal) -> str:
        self.counter += 1
        decision = build_decision(
            self.job_id, f"d{self.counter}", proposal, f"trigger-{self.counter}"
        )
        tracking.register_decision(self.state, decision, "tamiyo", self.config)
        return decision.decision_id

    def epochs(
        self, start: int, stop: int, val_loss: float | None = 0.69, **kw: Any
    ) -> list[Proposal]:
        """Feed epoch reports start..stop-1; every proposal made on the way."""
        out: list[Proposal] = []
        for epoch in range(start, stop):
            out += self.feed(report(self.job_id, epoch, val_loss, **kw))
        return out


FAST = PolicyConfig(warmup_epochs=2, patience=2, min_delta=0.01, evaluation_epochs=1)


class Harness:
    """Controllers on one Redis, a producer standing in for Tolaria, and the control stream."""

    def __init__(self, bus: BusSettings) -> None:
        self.bus = bus
        self.redis = connect(bus)
        self.producer = Producer(bus)
        self.running: list[Controller] = []
        self.instances = 0

    def controller(self, config: PolicyConfig = FAST, start: bool = True) -> Controller:
        self.instances += 1
        settings = TamiyoSettings(
            bus=self.bus, instance=f"tamiyo-{self.instances}", policy=config, heartbeat=False
        )
        store = TamiyoStore(connect(self.bus), self.bus, config)
        controller = Controller(settings, store, Catalogue(None), HeuristicPolicy())
        if start:
            controller.start()
            self.running.append(controller)
        return controller

    async def stop(self, controller: Controller) -> None:
        await controller.stop()
        await controller.store.redis.aclose()
        self.running.remove(controller)

    async def send(self, message: Message) -> Envelope:
        envelope = Envelope.wrap(on_the_wire(message), source="tolaria")
        await self.producer.publish(envelope)
        return envelope

    async def entries(self) -> list[tuple[Envelope, Message]]:
        """Everything on the control stream, in order."""
        entries: list[Any] = await self.redis.xrange(self.bus.stream("control"))  # type: ignore[assignment]
        out = []
        for _, fields in entries:
            envelope = Envelope.decode(fields[FIELD])
            out.append((envelope, envelope.message()))
        return out

    async def control(self) -> list[tuple[Envelope, ControlDecision]]:
        """The control.decision messages on the control stream."""
        return [(e, m) for e, m in await self.entries() if isinstance(m, ControlDecision)]

    async def answers(self, job_id: str) -> list[ControlAnswer]:
        """The control.answer messages to one job, in order."""
        found = [m for _, m in await self.entries() if isinstance(m, ControlAnswer)]
        return [a for a in found if a.job_id == job_id]

    async def state(self, job_id: str) -> JobState | None:
        store = TamiyoStore(self.redis, self.bus, FAST)
        return await store.state(job_id)

    async def close(self) -> None:
        for controller in list(self.running):
            await self.stop(controller)
        await self.producer.close()
        await self.redis.aclose()


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


async def handle(controller: Controller, message: Message, age_s: float = 0.0) -> None:
    """Hand one message to the controller as its consumer would, without the consumer: the test
    decides the order in which the two streams are read (and how old a message is)."""
    envelope = Envelope.wrap(on_the_wire(message), source="tolaria")
    envelope = envelope.model_copy(update={"ts": envelope.ts - age_s})
    delivery = Delivery(envelope, message, message.TOPIC, "s", "0-0", 1, "tamiyo", "c")
    if isinstance(message, TelemetryReport):
        await controller._on_report(delivery)
    else:
        await controller._on_event(delivery)

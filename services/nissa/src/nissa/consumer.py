"""Nissa reads every topic in its own consumer group and folds each message into `NissaState`.

Two consumers of one group: telemetry and health are high-rate and naturally idempotent (a
report or a beat applied twice changes nothing), so they skip the bus's dedupe keys; control,
events and jobs are counted (transitions, decisions, finished jobs), so the bus deduplicates them
by envelope id.

What arrives here already fits its contract: the bus dead-letters anything that is not JSON, not
an envelope, of an unknown type or version, or invalid, before a handler sees it (and
`buswatch` counts those). A handler never raises: a failure here is a bug in Nissa, retrying the
message would fail the same way, and one bad message must not stop the others; it is logged and
counted (`esper_nissa_handler_errors_total`) instead.
"""

from __future__ import annotations

import logging

from esper.bus import BusSettings, Consumer, Delivery, Handler
from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    DecisionTaken,
    Heartbeat,
    JobQueued,
    JobStatusChanged,
    KernelReady,
    Message,
    SeedTransition,
    TelemetryReport,
)
from nissa.state import NissaState

log = logging.getLogger("nissa.consumer")

FAST_TOPICS = ("telemetry", "health")
COUNTED_TOPICS = ("control", "events", "jobs")


def _apply(state: NissaState, message: Message, sent: float) -> None:
    if isinstance(message, TelemetryReport):
        state.on_telemetry(message, sent)
    elif isinstance(message, Heartbeat):
        state.on_heartbeat(message, sent)
    elif isinstance(message, SeedTransition):
        state.on_transition(message, sent)
    elif isinstance(message, ControlDecision):
        state.on_decision(message, sent)
    elif isinstance(message, DecisionTaken):
        state.on_decision_taken(message, sent)
    elif isinstance(message, ControlAnswer):
        state.on_answer(message, sent)
    elif isinstance(message, DecisionPointMissed):
        state.on_point_missed(message, sent)
    elif isinstance(message, JobStatusChanged):
        state.on_job_status(message, sent)
    elif isinstance(message, JobQueued):
        state.on_job_queued(message, sent)
    elif isinstance(message, KernelReady):
        state.on_kernel_ready(message)
    # Any other contract (a newer one this Nissa does not know how to fold) is only counted.


def handler(state: NissaState) -> Handler:
    async def handle(delivery: Delivery) -> None:
        envelope = delivery.envelope
        topic = delivery.topic
        state.count("esper_bus_messages", (topic, envelope.type))
        try:
            _apply(state, delivery.message, envelope.ts)
        except Exception:
            state.count("esper_nissa_handler_errors", (envelope.type,))
            log.exception(
                "message %s (%s) on %s not folded into Nissa's state",
                envelope.id,
                envelope.type,
                topic,
            )

    return handle


def consumers(state: NissaState, bus: BusSettings, group: str) -> list[Consumer]:
    """The two consumers, not started. Topics missing from `bus.topics` are left out."""
    handle = handler(state)
    made = []
    for topics, dedupe in ((FAST_TOPICS, False), (COUNTED_TOPICS, True)):
        present = [t for t in topics if t in bus.topics]
        if present:
            made.append(Consumer(group, present, settings=bus, handler=handle, dedupe=dedupe))
    return made

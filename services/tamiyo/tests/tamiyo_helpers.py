"""Helpers of Tamiyo's tests (imported by name: conftest puts this directory on the path).

They build real contract messages — TelemetryReport, SeedTransition, DecisionTaken — the way a
Tolaria job would send them, so the tests feed Tamiyo what it gets in production.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from esper.contracts import (
    DecisionTaken,
    JobStatusChanged,
    LayerStats,
    RefusalCode,
    SeedStats,
    SeedTransition,
    TelemetryReport,
)
from tamiyo import tracking
from tamiyo.catalogue import builtin_catalogue
from tamiyo.config import PolicyConfig
from tamiyo.controller import build_decision
from tamiyo.models import JobState
from tamiyo.policy import Context, HeuristicPolicy, Proposal

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
) -> TelemetryReport:
    return TelemetryReport(
        job_id=job_id,
        epoch=epoch,
        step=step if step is not None else (epoch + 1) * STEPS_PER_EPOCH,
        kind=kind,  # type: ignore[arg-type]
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        layers=list(default_layers() if layers is None else layers),
        seeds=list(seeds),
    )


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

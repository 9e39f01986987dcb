"""The controller: consumes telemetry and events in the consumer group `tamiyo`, runs the
bookkeeping and the policy on the job's state, and publishes the decisions.

Every message is handled in one `TamiyoStore.transact`: read the job's state, apply the message,
ask the policy, write the state and XADD the decisions in one MULTI/EXEC. A decision's id is
derived from the job and the id of the message that triggered it (esper.policy.decisions, the
code the in-process LocalController uses too), so running the same handling again (after a
compare-and-set conflict, say) yields the same decision, never a second one; and since the state
written with it says the message was handled, a redelivered message decides nothing. Operators'
decisions (`POST /jobs/{id}/decisions`) go through the same path.

A decision-point report (`decision_point`: the job waits) gets exactly one `control.answer`,
decisions or none, published in the same transaction; its decisions travel only in it, never
also as `control.decision`. Their ids and `trigger` come from the point (`point:kind:epoch:step`),
which is the same in every run of the job, not from the envelope. A point asked again (a job
resumed from a checkpoint, a redelivery) gets the answer kept for it, and is not read again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from esper.bus import Consumer, Delivery
from esper.contracts import (
    ControlDecision,
    DecisionTaken,
    Envelope,
    JobStatusChanged,
    Message,
    SeedTransition,
    TelemetryReport,
)
from esper.contracts.jobs import HostKind
from esper.policy import tracking
from esper.policy.choice import BlueprintInfo
from esper.policy.config import PolicyConfig
from esper.policy.decisions import (
    MAX_DECISIONS,
    answer_for,
    build_decision,
    derive_decision_id,
    point_trigger,
)
from esper.policy.models import JobState, Origin
from esper.policy.policy import Context, Policy, Proposal
from tamiyo import answers
from tamiyo.catalogue import Catalogue
from tamiyo.checks import check_manual
from tamiyo.errors import (
    DecisionConflictError,
    InvalidDecisionError,
    UnknownJobError,
    UrzaUnavailableError,
)
from tamiyo.models import DecisionRecord, ManualDecision
from tamiyo.settings import TamiyoSettings
from tamiyo.store import Change, TamiyoStore

log = logging.getLogger("tamiyo.controller")
GROUP = "tamiyo"
SOURCE = "tamiyo"


class Metrics:
    def __init__(self, registry: CollectorRegistry, store: TamiyoStore) -> None:
        self.decisions = Counter(
            "esper_tamiyo_decisions",
            "Decisions published, by action and source",
            ["action", "source"],
            registry=registry,
        )
        self.messages = Counter(
            "esper_tamiyo_messages",
            "Telemetry and events handled, by type and result (applied or ignored)",
            ["type", "result"],
            registry=registry,
        )
        self.answers = Counter(
            "esper_tamiyo_answers",
            "Answers to decision points, by result (decided, nothing, repeated, forgotten)",
            ["result"],
            registry=registry,
        )
        self.latency = Histogram(
            "esper_tamiyo_decision_latency_seconds",
            "From the triggering telemetry's publish (envelope ts) to the XADD of the decision "
            "(or of the answer, for a decision point)",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        conflicts = Gauge(
            "esper_tamiyo_state_conflicts",
            "Handlings run again because another writer changed the job's state first",
            registry=registry,
        )
        conflicts.set_function(lambda: float(store.conflicts))


class Controller:
    def __init__(
        self,
        settings: TamiyoSettings,
        store: TamiyoStore,
        catalogue: Catalogue,
        policy: Policy,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.policy = policy
        self.max_report_age_s = settings.max_report_age_s
        self.metrics = Metrics(registry or CollectorRegistry(), store)
        self.consumer = Consumer(
            GROUP,
            ["telemetry", "events"],
            settings=settings.bus,
            name=f"{settings.instance}-controller",
        )
        self.consumer.register(TelemetryReport, self._on_report)
        for event in (SeedTransition, DecisionTaken, JobStatusChanged):
            self.consumer.register(event, self._on_event)

    def start(self) -> None:
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop(timeout=10)
        await self.consumer.close()

    # -------------------------------------------------------------- telemetry
    async def _on_report(self, delivery: Delivery) -> None:
        report = delivery.message
        assert isinstance(report, TelemetryReport)
        for taken in report.answers:
            await self.store.record_outcome(taken)  # once: its event later changes nothing
        if report.decision_point:
            await self._on_point(delivery, report)
            return
        kinds = await self._kernel_kinds(report)
        catalogue, source = await self.catalogue.entries()
        trigger = delivery.envelope.id
        age = time.time() - delivery.envelope.ts
        # Only a v1 report (a job from before decision points) is decided on unasked.
        asks_nothing = delivery.envelope.version >= 2

        def mutate(stored: JobState | None, config: PolicyConfig) -> Change | None:
            state = stored if stored is not None else tracking.new_state(report.job_id)
            answered = tracking.ingest_answers(state, report.answers, config)
            if not tracking.ingest_report(state, report, config, kinds):
                return Change(state) if answered else None
            proposals: list[Proposal] = []
            if report.kind == "epoch" and asks_nothing:
                # A job that decides at points and did not ask here (its last epoch; or its
                # decisions come from a fixed schedule): Tamiyo decides only when asked, and a
                # decision sent unasked would reach the job as an operator's.
                state.note = f"epoch {report.epoch} report asks nothing: recorded only"
            elif report.kind == "epoch" and age > self.max_report_age_s:
                # A backlog (Tamiyo was down, or a new group reads old history): the job has
                # moved on since, so the report is recorded but not acted on.
                state.note = f"epoch {report.epoch} report is {age:.0f} s old: recorded only"
            elif report.kind == "epoch":
                context = Context(config, catalogue, source)
                proposals = self.policy.on_report(state, report, context)
            return self._change(state, proposals, trigger, config)

        change = await self.store.transact(report.job_id, mutate)
        self._count(report, change, delivery.envelope.ts)

    async def _on_point(self, delivery: Delivery, report: TelemetryReport) -> None:
        """Answer a decision point: the answer kept for it, or the policy's decisions now."""
        kinds = await self._kernel_kinds(report)
        catalogue, source = await self.catalogue.entries()
        age = time.time() - delivery.envelope.ts
        result: list[answers.Result] = []

        def mutate(stored: JobState | None, config: PolicyConfig) -> Change:
            state = stored if stored is not None else tracking.new_state(report.job_id)
            result.clear()  # runs again after a compare-and-set conflict
            kept = state.answers.get(report.point)
            change = Change(state)
            outcome: answers.Result
            if kept is not None:
                answer, outcome = kept, "repeated"
            elif not tracking.is_new(state, report):
                answer, outcome = answers.forgotten(state, report), "forgotten"
            else:
                context = Context(config, catalogue, source)
                change = self._decide_point(state, report, config, context, kinds)
                answer = answer_for(report, [r.decision for r in change.records], state.note)
                answer = answers.with_age(answer, age, self.max_report_age_s)
                tracking.keep_answer(state, answer)
                outcome = "decided" if answer.decisions else "nothing"
            envelope = Envelope.wrap(answer, source=SOURCE, correlation_id=delivery.envelope.id)
            change.envelopes.append(envelope)
            result.append(outcome)
            return change

        change = await self.store.transact(report.job_id, mutate)
        self.metrics.answers.labels(result[0]).inc()
        self._count(report, change, delivery.envelope.ts)

    def _decide_point(
        self,
        state: JobState,
        report: TelemetryReport,
        config: PolicyConfig,
        context: Context,
        kinds: dict[str, HostKind],
    ) -> Change:
        """The job's answers, then its report, then the policy (at an epoch's point: a step's has
        no validation metrics to decide from); the decisions are recorded, not published."""
        tracking.ingest_answers(state, report.answers, config)
        applied = tracking.ingest_report(state, report, config, kinds)
        assert applied, "is_new said the report comes after every one handled"
        state.note = ""
        proposals: list[Proposal] = []
        if report.kind == "epoch":
            proposals = self.policy.on_report(state, report, context)
        else:
            state.note = (
                "step point: Tamiyo decides at an epoch's point, from the validation metrics "
                "measured there"
            )
        why = state.note or "the policy proposed nothing"
        trigger = point_trigger(report.point)
        proposals = proposals[:MAX_DECISIONS]
        change = self._change(state, proposals, trigger, config, publish=False)
        state.note = answers.note(change.records, why)
        return change

    async def _kernel_kinds(self, report: TelemetryReport) -> dict[str, HostKind]:
        """Host kinds of the report's kernels (v1 and v2 telemetry do not say a layer's kind;
        Urza knows each kernel's host). Asked outside the transaction: HTTP must not hold it
        open."""
        kinds: dict[str, HostKind] = {}
        for seed in report.seeds:
            if seed.kernel_id is not None and seed.kernel_id not in kinds:
                kind = await self.catalogue.kernel_kind(seed.kernel_id)
                if kind is not None:
                    kinds[seed.kernel_id] = kind
        return kinds

    # ----------------------------------------------------------------- events
    async def _on_event(self, delivery: Delivery) -> None:
        event = delivery.message
        assert isinstance(event, SeedTransition | DecisionTaken | JobStatusChanged)
        if isinstance(event, DecisionTaken):
            await self.store.record_outcome(event)
        catalogue, source = await self.catalogue.entries()
        trigger = delivery.envelope.id

        def mutate(stored: JobState | None, config: PolicyConfig) -> Change | None:
            if stored is None:
                # Events never create a job's state, except the one that says it started.
                if not (isinstance(event, JobStatusChanged) and event.status == "RUNNING"):
                    return None
                stored = tracking.new_state(event.job_id)
            if not tracking.ingest_event(stored, event, config):
                return None
            proposals: list[Proposal] = []
            if not stored.points:  # a job that asks at points takes decisions only in answers
                proposals = self.policy.on_event(stored, event, Context(config, catalogue, source))
            return self._change(stored, proposals, trigger, config)

        change = await self.store.transact(event.job_id, mutate)
        self._count(event, change, delivery.envelope.ts)

    # -------------------------------------------------------------- decisions
    def _change(
        self,
        state: JobState,
        proposals: Sequence[Proposal],
        trigger: str,
        config: PolicyConfig,
        *,
        publish: bool = True,
    ) -> Change:
        change = Change(state)
        for index, proposal in enumerate(proposals):
            decision = build_decision(
                state.job_id, derive_decision_id(state.job_id, trigger, index), proposal, trigger
            )
            self._add(change, decision, "tamiyo", config, trigger, publish=publish)
        return change

    def _add(
        self,
        change: Change,
        decision: ControlDecision,
        origin: Origin,
        config: PolicyConfig,
        trigger: str | None,
        *,
        publish: bool = True,
    ) -> DecisionRecord:
        """Register and record `decision`; XADD it as a control.decision unless it travels in a
        point's answer (`publish` False: the job would see it twice)."""
        state = change.state
        tracking.register_decision(state, decision, origin, config)
        source: Literal["tamiyo", "operator"] = "operator" if origin == "operator" else "tamiyo"
        record = DecisionRecord(
            decision=decision,
            source=source,
            policy=self.policy.name if source == "tamiyo" else "operator",
            trigger=trigger,
            epoch=state.last_epoch,
        )
        if publish:
            envelope = Envelope.wrap(
                decision, source=SOURCE, correlation_id=trigger or decision.decision_id
            )
            change.envelopes.append(envelope)
        change.records.append(record)
        seed = "any free seed" if decision.seed is None else f"seed {decision.seed}"
        state.note = f"{source} decided {decision.action} ({seed} of layer {decision.layer!r})"
        return record

    def _count(self, message: Message, change: Change | None, sent_at: float) -> None:
        self.metrics.messages.labels(message.TYPE, "ignored" if change is None else "applied").inc()
        if change is None:
            return
        for _ in change.envelopes:
            self.metrics.latency.observe(max(0.0, time.time() - sent_at))
        for record in change.records:
            decision = record.decision
            self.metrics.decisions.labels(decision.action, "tamiyo").inc()
            log.info(
                "job %s: %s %s",
                decision.job_id,
                decision.action,
                decision.reason,
                extra={"job_id": decision.job_id, "decision_id": decision.decision_id},
            )

    # ------------------------------------------------------------- operators
    async def manual(self, job_id: str, body: ManualDecision) -> tuple[DecisionRecord, bool]:
        """Validate and publish an operator's decision; (record, created). The same
        `decision_id` again returns the first record (created False)."""
        decision = _manual_decision(job_id, body)
        existing = await self.store.decision(decision.decision_id)
        if existing is not None:
            return _same_or_conflict(existing, decision), False
        blueprint = await self._blueprint(decision)
        result: list[DecisionRecord] = []

        def mutate(stored: JobState | None, config: PolicyConfig) -> Change | None:
            if stored is None:
                raise UnknownJobError(
                    "unknown_job",
                    f"Tamiyo has no state for job {job_id!r}: it has seen no telemetry nor "
                    "start event of it",
                    ["path", "job_id"],
                )
            if decision.decision_id in stored.decisions:
                return None  # the same request, racing: the first one published it
            check_manual(stored, decision, blueprint)
            change = Change(stored)
            result.append(self._add(change, decision, "operator", config, None))
            return change

        change = await self.store.transact(job_id, mutate)
        if change is None:
            record = await self.store.decision(decision.decision_id)
            assert record is not None
            return _same_or_conflict(record, decision), False
        self.metrics.decisions.labels(decision.action, "operator").inc()
        return result[0], True

    async def _blueprint(self, decision: ControlDecision) -> BlueprintInfo | None:
        if decision.blueprint is None:
            return None
        try:
            found = await self.catalogue.find(decision.blueprint)
        except LookupError as err:
            raise UrzaUnavailableError(
                "urza_unavailable", f"cannot check the blueprint: {err}", ["body", "blueprint"]
            ) from None
        if found is None:
            raise InvalidDecisionError(
                "unknown_blueprint",
                f"Urza has no blueprint {decision.blueprint!r}",
                ["body", "blueprint"],
            )
        return found


def _manual_decision(job_id: str, body: ManualDecision) -> ControlDecision:
    fields = body.model_dump(exclude={"decision_id"})
    decision_id = body.decision_id or f"op-{uuid.uuid4().hex[:24]}"
    try:
        return ControlDecision(decision_id=decision_id, job_id=job_id, **fields)
    except ValidationError as err:
        first = err.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidDecisionError(
            "invalid_decision",
            f"not a valid decision: {message}",
            ["body", *[str(p) for p in first["loc"]]],
        ) from None


def _same_or_conflict(existing: DecisionRecord, decision: ControlDecision) -> DecisionRecord:
    if existing.decision.job_id != decision.job_id or existing.decision.model_dump(
        exclude={"decision_id"}
    ) != decision.model_dump(exclude={"decision_id"}):
        raise DecisionConflictError(
            "conflict",
            f"decision {decision.decision_id} exists with other content",
            ["body", "decision_id"],
        )
    return existing

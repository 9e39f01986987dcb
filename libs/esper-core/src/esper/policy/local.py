"""LocalController: the policy as an in-process controller for one job, no stack.

It does with a job's messages what Tamiyo's controller does with them off the bus (Tamiyo's
controller.py, `_on_event`, `_on_report` and `_on_point`), with the state in memory and the
built-in catalogue:

- events first, in the order they came (a job's SeedTransitions and the DecisionTaken answers to
  its decisions): the bookkeeping's `ingest_event`. A job that asks at decision points is read
  from its points alone, so once its first point came the transitions change nothing, and an
  answer counts once whether its event or the copy in the next report is read first;
- a decision point (`report.decision_point`): the answers it carries, then the report, then the
  policy (at an epoch's point; a step's has no validation metrics to decide from). Each proposal
  becomes a ControlDecision with the id Tamiyo would give it (esper.policy.decisions), and is
  registered (a germination is pending until its DecisionTaken comes). A point asked again gets
  the decisions of the answer kept for it;
- any other report is recorded only: a job that decides at points gets decisions only there.

The policy runs only when a point is answered, so the same reports give the same decisions at the
same points, whatever the speed of the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from esper.contracts import (
    ControlDecision,
    Message,
    TelemetryReport,
)
from esper.contracts.jobs import HostKind
from esper.exceptions import ConfigError
from esper.policy import tracking
from esper.policy.catalogue import builtin_catalogue
from esper.policy.choice import BlueprintInfo
from esper.policy.config import PolicyConfig
from esper.policy.decisions import (
    MAX_DECISIONS,
    answer_for,
    build_decision,
    decisions_note,
    derive_decision_id,
    point_trigger,
)
from esper.policy.models import JobState
from esper.policy.policy import Context, HeuristicPolicy, Policy, Proposal

KernelKind = Callable[[str], HostKind | None]
"""The host kind of a kernel id, or None when unknown (Tamiyo asks Urza; a local job its
registry): telemetry does not say a layer's kind, its seeds' kernels do."""


class LocalController:
    """One job's controller in this process: `answer(report, events)` at each decision point."""

    def __init__(
        self,
        job_id: str,
        config: PolicyConfig | None = None,
        *,
        policy: Policy | None = None,
        catalogue: Sequence[BlueprintInfo] | None = None,
        kernel_kind: KernelKind | None = None,
    ) -> None:
        self.config = config if config is not None else PolicyConfig()
        self.policy = policy if policy is not None else HeuristicPolicy()
        builtin = catalogue is None
        self.context = Context(
            self.config,
            list(builtin_catalogue() if catalogue is None else catalogue),
            "builtin" if builtin else "local",
        )
        self.kernel_kind = kernel_kind
        self.state: JobState = tracking.new_state(job_id)

    @property
    def job_id(self) -> str:
        return self.state.job_id

    @property
    def note(self) -> str:
        """What the controller did last, or why it did nothing, in words."""
        return self.state.note

    def answer(
        self, report: TelemetryReport, events: Sequence[Message] = ()
    ) -> list[ControlDecision]:
        """Apply `events`, then `report`; the decisions for `report` (none unless it is a
        decision point of an epoch, or a point asked again whose answer had decisions)."""
        for event in events:
            if getattr(event, "job_id", self.job_id) == self.job_id:
                tracking.ingest_event(self.state, event, self.config)
        if report.job_id != self.job_id:
            raise ConfigError(
                f"a report of job {report.job_id!r} sent to the controller of job {self.job_id!r}"
            )
        if not report.decision_point:
            tracking.ingest_answers(self.state, report.answers, self.config)
            tracking.ingest_report(self.state, report, self.config, self._kinds(report))
            return []
        kept = self.state.answers.get(report.point)
        if kept is not None:
            return list(kept.decisions)
        if not tracking.is_new(self.state, report):
            self.state.note = (
                f"point {report.point} is not after the last report handled and no answer to it "
                "is kept: no decisions"
            )
            return []
        return self._decide(report)

    def _decide(self, report: TelemetryReport) -> list[ControlDecision]:
        state, config = self.state, self.config
        tracking.ingest_answers(state, report.answers, config)
        applied = tracking.ingest_report(state, report, config, self._kinds(report))
        assert applied, "is_new said the report comes after every one handled"
        state.note = ""
        proposals: list[Proposal] = []
        if report.kind == "epoch":
            proposals = self.policy.on_report(state, report, self.context)
        else:
            state.note = "step point: decisions come at an epoch's point, from its metrics"
        why = state.note or "the policy proposed nothing"
        trigger = point_trigger(report.point)
        decisions = [
            build_decision(state.job_id, derive_decision_id(state.job_id, trigger, i), p, trigger)
            for i, p in enumerate(proposals[:MAX_DECISIONS])
        ]
        for decision in decisions:
            tracking.register_decision(state, decision, "tamiyo", config)
        state.note = decisions_note(decisions, why)
        tracking.keep_answer(state, answer_for(report, decisions, state.note))
        return decisions

    def _kinds(self, report: TelemetryReport) -> dict[str, HostKind]:
        kinds: dict[str, HostKind] = {}
        if self.kernel_kind is None:
            return kinds
        for seed in report.seeds:
            if seed.kernel_id is not None and seed.kernel_id not in kinds:
                kind = self.kernel_kind(seed.kernel_id)
                if kind is not None:
                    kinds[seed.kernel_id] = kind
        return kinds

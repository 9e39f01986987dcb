"""Decision points: the only places where a job's seeds change.

At the end of every epoch (and every `morphogenesis.decide_every_steps` steps, if set) the job
reports, waits for the controller's answer to that report, bounded by
`morphogenesis.decision_timeout_s`, and executes it before its next step; operators' decisions
that came meanwhile are executed there too, after the controller's. Training never sees a
decision at a step chosen by timing, so the same spec, data and seed give the same decisions at
the same steps and the same metrics, on a loaded machine as on an idle one.

With `morphogenesis.controller: schedule` the spec's schedule answers each point instead
(schedule.py): nothing is waited for and no point is missed.

A point that gets no answer (no controller alive, or none in time) is passed: the job goes on,
emits `event.decision_point_missed`, and never applies a late answer.

Crash safety: the point asked at an epoch's end is saved in the checkpoint with the epoch, and
marked settled in a second checkpoint once its answer was executed; a job resumed from a
checkpoint whose point is still open asks it again, and the controller answers a point it has
answered with the same answer. Answers to executed decisions travel with the next report, so the
controller reads them in the job's order.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    DecisionTaken,
    TelemetryReport,
)
from esper.contracts.jobs import MorphogenesisSpec
from esper.training import SeedOrchestrator
from tolaria.lockstep import Lockstep
from tolaria.runtime import JobRuntime
from tolaria.schedule import scheduled_answer

log = logging.getLogger("tolaria.job")

EXECUTE_TIMEOUT_S = 600.0
"""A decision may compile a kernel in Urza and retry while it is away (`kernel_retry_s`)."""


class DecisionPoints:
    def __init__(
        self,
        runtime: JobRuntime,
        orchestrator: SeedOrchestrator,
        spec: MorphogenesisSpec,
        lockstep: Lockstep | None = None,
    ) -> None:
        self.runtime = runtime
        self.lockstep = lockstep
        """A distributed job's ranks: rank 0 asks, every rank executes what it got."""
        self.orchestrator = orchestrator
        self.spec = spec
        self.timeout_s = spec.decision_timeout_s
        self.every_steps = spec.decide_every_steps
        self.open: TelemetryReport | None = None
        """The point asked and not settled yet (saved in the checkpoint)."""
        self.unreported: list[DecisionTaken] = []
        """Answers to executed decisions, for the next report."""
        self.missed = 0
        self.executed: list[tuple[str, int, str]] = []
        """(decision id, step, outcome) of each decision this process executed."""
        self.to_release: list[ControlDecision] = []
        """Operators' decisions executed since the last checkpoint: out of the inbox once a
        checkpoint holds their effect (`release`)."""

    def take_answers(self) -> list[DecisionTaken]:
        """The answers for the report being built (they leave with it)."""
        answers, self.unreported = self.unreported, []
        return answers

    @property
    def asks_controller(self) -> bool:
        """Whether the points are questions to the controller on the bus (marked
        `decision_point` in their reports); a schedule's are answered here, and a controller
        that saw them marked would answer, and record decisions, for nothing."""
        return self.spec.controller == "tamiyo"

    def ask(self, report: TelemetryReport) -> None:
        """`report` (already queued for publishing) is the decision point to settle."""
        self.open = report

    def settle(self, *, step: int, epoch: int) -> bool:
        """Wait for the answer to the open point and execute it, then the operators' waiting
        decisions. Returns whether the point is settled with something to checkpoint: anything
        executed, or the point passed unanswered (a resumed job must not ask it again and apply
        an answer this run never did). A stop requested while waiting leaves the point open."""
        report = self.open
        if report is None:
            return False
        lockstep = self.lockstep
        plan = self._plan(report) if lockstep is None or lockstep.leads else None
        if lockstep is not None:
            plan = lockstep.share(plan)
        assert plan is not None
        decisions, held, answered, stopped = plan
        executed = 0
        for decision in decisions:
            self._execute(decision, step=step, epoch=epoch)
            executed += 1
        for decision in held:
            self._execute(decision, step=step, epoch=epoch)
            self.to_release.append(decision)
            executed += 1
        if stopped:
            return executed > 0
        self.open = None
        return executed > 0 or not answered

    def _plan(
        self, report: TelemetryReport
    ) -> tuple[list[ControlDecision], list[ControlDecision], bool, bool]:
        """(the controller's decisions, the operators' waiting ones, whether the controller
        answered, whether a stop came while waiting)."""
        answer = self._answer(report)
        held: list[ControlDecision] = []
        while not self.runtime.decisions.empty():
            held.append(self.runtime.decisions.get())
        stopped = answer is None and self.runtime.stop_event.is_set()
        decisions = list(answer.decisions) if answer is not None else []
        return decisions, held, answer is not None, stopped

    def release(self) -> None:
        """Call after a checkpoint: the operators' decisions it holds leave the inbox."""
        released, self.to_release = self.to_release, []
        self.runtime.release_decisions(released)

    def _answer(self, report: TelemetryReport) -> ControlAnswer | None:
        if self.spec.controller == "schedule":
            # No controller to ask: the spec's schedule answers at once, and never misses.
            return scheduled_answer(self.spec, report)
        runtime = self.runtime
        started = time.monotonic()
        if not runtime.controller_alive():
            self._missed(report, "no_controller", 0.0)
            return None
        answer = runtime.wait_answer(report.point, self.timeout_s)
        waited = time.monotonic() - started
        if answer is None:
            if not runtime.stop_event.is_set():
                self._missed(report, "timeout", waited)
            return None
        if answer.decisions or log.isEnabledFor(logging.DEBUG):
            log.info(
                "decision point %s answered in %.3f s: %d decision(s) — %s",
                report.point,
                waited,
                len(answer.decisions),
                answer.note,
            )
        return answer

    def _execute(self, decision: ControlDecision, *, step: int, epoch: int) -> DecisionTaken:
        self.orchestrator.on_step(step)
        outcome = self.runtime.call(
            self.orchestrator.execute(decision, step=step, epoch=epoch),
            timeout=EXECUTE_TIMEOUT_S,
        )
        self.unreported.append(outcome)
        self.executed.append((outcome.decision_id, step, outcome.outcome))
        log.info(
            "decision %s (%s %s): %s — %s",
            outcome.decision_id,
            outcome.action,
            outcome.layer,
            outcome.outcome,
            outcome.reason,
        )
        return outcome

    def _missed(
        self, report: TelemetryReport, reason: Literal["timeout", "no_controller"], waited: float
    ) -> None:
        self.missed += 1
        event = DecisionPointMissed(
            job_id=report.job_id,
            epoch=report.epoch,
            step=report.step,
            kind=report.kind,
            reason=reason,
            waited_s=round(waited, 3),
        )
        self.runtime.emit(event)
        why = (
            f"no answer in {self.timeout_s:g} s"
            if reason == "timeout"
            else "no controller alive (no heartbeat on the health topic)"
        )
        log.warning("decision point %s passed without decisions: %s", report.point, why)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "open": self.open.model_dump(mode="json") if self.open is not None else None,
            "unreported": [a.model_dump(mode="json") for a in self.unreported],
            "missed": self.missed,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        opened = state.get("open")
        self.open = TelemetryReport.model_validate(opened) if opened is not None else None
        self.unreported = [DecisionTaken.model_validate(a) for a in state.get("unreported", [])]
        self.missed = int(state.get("missed", 0))

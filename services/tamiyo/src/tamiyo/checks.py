"""What an operator's decision must satisfy before Tamiyo publishes it.

The contract (ControlDecision) is checked first, where the request body is read. Here it is held
against what Tamiyo knows of the job: the layer must be one its telemetry reported, a blueprint
must fit the layer's kind when that is known, a germination must not overlap one in flight, and
keep / retire / set_alpha must name a seed that is ACTIVE in the latest telemetry. The job checks
again when it executes (its state may have moved on); these checks catch what is wrong already.
"""

from __future__ import annotations

from esper.contracts import ControlDecision
from esper.policy.choice import BlueprintInfo
from esper.policy.models import JobState
from esper.policy.tracking import under_evaluation
from tamiyo.errors import DecisionConflictError, InvalidDecisionError


def check_manual(
    state: JobState, decision: ControlDecision, blueprint: BlueprintInfo | None
) -> None:
    if state.finished:
        raise DecisionConflictError(
            "job_finished", f"job {state.job_id} is {state.status}", ["path", "job_id"]
        )
    layer = state.layers.get(decision.layer)
    if layer is None:
        known = ", ".join(sorted(state.layers)) or "none yet"
        raise InvalidDecisionError(
            "unknown_layer",
            f"job {state.job_id} reported no layer {decision.layer!r} (its layers: {known})",
            ["body", "layer"],
        )
    if decision.action == "germinate":
        _check_germinate(state, decision, blueprint, layer.kind)
        return
    assert decision.seed is not None  # the contract requires it for these actions
    track = state.track(decision.layer, decision.seed)
    if track is None or track.state != "ACTIVE":
        now = "DORMANT" if track is None else track.state
        raise InvalidDecisionError(
            "seed_not_active",
            f"cannot {decision.action} seed {decision.seed} of layer {decision.layer!r}: it is "
            f"{now} in the job's latest telemetry, not ACTIVE",
            ["body", "seed"],
        )


def _check_germinate(
    state: JobState, decision: ControlDecision, blueprint: BlueprintInfo | None, kind: str | None
) -> None:
    if blueprint is not None and kind is not None and not blueprint.fits(kind):
        raise InvalidDecisionError(
            "blueprint_does_not_fit",
            f"blueprint {blueprint.name} serves {'/'.join(blueprint.hosts)} layers; layer "
            f"{decision.layer!r} is {kind}",
            ["body", "blueprint"],
        )
    in_flight = state.pending.decision_id if state.pending is not None else None
    judging = under_evaluation(state)
    if in_flight is not None or judging is not None:
        what = (
            f"germination {in_flight}"
            if in_flight or judging is None
            else f"seed {judging.seed} of layer {judging.layer!r} (under evaluation)"
        )
        raise DecisionConflictError(
            "germination_in_flight",
            f"one germination in flight per job: {what} is not settled yet",
            ["path", "job_id"],
        )
    if decision.seed is not None and state.track(decision.layer, decision.seed) is not None:
        raise InvalidDecisionError(
            "slot_taken",
            f"seed {decision.seed} of layer {decision.layer!r} is not DORMANT",
            ["body", "seed"],
        )

"""From a policy's `Proposal` to the `ControlDecision` a job executes, and its id.

One code for every host of the policy (Tamiyo, the in-process `LocalController`): the same report
at the same decision point gives the same decisions with the same ids, in both places.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from esper.contracts import ControlAnswer, ControlDecision, TelemetryReport, clip
from esper.policy.policy import Proposal

MAX_DECISIONS = 16
"""What one ControlAnswer holds (its `decisions` max_length); a policy proposing more at one
point is cut here, the rest wait for the next point."""


def derive_decision_id(job_id: str, trigger: str, index: int) -> str:
    """The same (job, triggering message, position) always names the same decision."""
    digest = hashlib.sha256(f"{job_id}\x00{trigger}\x00{index}".encode()).hexdigest()
    return f"tmy-{digest[:24]}"


def point_trigger(point: str) -> str:
    """The trigger of the decisions answering decision point `point` (`TelemetryReport.point`):
    where the job was in training, the same in every run of it, never a message's id."""
    return f"point:{point}"


def build_decision(job_id: str, decision_id: str, p: Proposal, trigger: str) -> ControlDecision:
    evidence = {**p.evidence, "trigger": trigger}
    return ControlDecision(
        decision_id=decision_id,
        job_id=job_id,
        action=p.action,
        layer=p.layer,
        seed=p.seed,
        blueprint=p.blueprint,
        blend=p.blend,
        strategy=p.strategy,
        ramp_steps=p.ramp_steps,
        alpha=p.alpha,
        reason=clip(p.reason),
        evidence={k: clip(v) if isinstance(v, str) else v for k, v in evidence.items()},
    )


def decisions_note(decisions: Sequence[ControlDecision], why: str) -> str:
    """The decisions in words, or why there are none (`why`: the policy's note): an answer's
    note is never empty, so a job that gets no decisions knows why."""
    if not decisions:
        return f"nothing to do: {why}"
    parts = []
    for d in decisions:
        seed = "any free seed" if d.seed is None else f"seed {d.seed}"
        parts.append(f"{d.action} ({seed} of layer {d.layer!r}): {d.reason}")
    return "; ".join(parts)


def answer_for(
    report: TelemetryReport, decisions: Sequence[ControlDecision], note: str
) -> ControlAnswer:
    """The `control.answer` to decision point `report`."""
    return ControlAnswer(
        job_id=report.job_id,
        epoch=report.epoch,
        step=report.step,
        kind=report.kind,
        decisions=list(decisions),
        note=clip(note),
    )

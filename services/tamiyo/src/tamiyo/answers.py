"""The `control.answer` to a job's decision point, and its note: what Tamiyo made of the report,
in words, never empty, so a job that gets no decisions knows why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from esper.contracts import ControlAnswer, TelemetryReport, clip
from esper.policy.decisions import answer_for, decisions_note
from esper.policy.models import JobState
from esper.policy.tracking import MAX_ANSWERS
from tamiyo.models import DecisionRecord

Result = Literal["decided", "nothing", "repeated", "forgotten"]
"""decided / nothing: answered from the report; repeated: the point was asked again and got the
answer kept for it; forgotten: asked again, and no answer to it is kept any more."""


def note(records: Sequence[DecisionRecord], why: str) -> str:
    """The decisions in words, or why there are none (`why`: the policy's note)."""
    return decisions_note([record.decision for record in records], why)


def with_age(answer: ControlAnswer, age_s: float, max_age_s: float) -> ControlAnswer:
    """A point read long after it was sent is answered all the same (the job may still be
    waiting: it decides whether an answer came in time), and the note says how late it is."""
    if age_s <= max_age_s:
        return answer
    late = f" (the report was read {age_s:.0f} s after it was sent)"
    return answer.model_copy(update={"note": clip(answer.note + late)})


def forgotten(state: JobState, report: TelemetryReport) -> ControlAnswer:
    """A point at or before the last report handled whose answer is no longer kept."""
    where = f"epoch {state.last_epoch}" + (
        f", step {state.last_step}" if state.last_step is not None else ""
    )
    return answer_for(
        report,
        [],
        f"nothing to do: point {report.point} is not after the last report handled ({where}) "
        f"and no answer to it is kept (the last {MAX_ANSWERS} points' are): no decisions",
    )

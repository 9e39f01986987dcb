"""External runs: a training loop in the user's own process (`esper.session(...,
controller="stack")`) registered with Tolaria as a job whose model and dataset are of kind
`external`, and the two bodies that carry it through Tolaria:

    POST /jobs                  {model: {kind: external}, dataset: {kind: external}, ...}
                                → 202, the job RUNNING at once (no worker trains it)
    POST /jobs/{id}/reports     RunReport → RunReply: Tolaria stores and publishes what the run
                                measured and did; at a decision point it waits for the
                                controller's answer (as a job process does) and returns it
    POST /jobs/{id}/end         RunEnd → the job's view, ended as the run says

The run applies the decisions it is given at the point they answer and nowhere else, so the
same script, data and torch seed give the same decisions at the same steps whether the policy
answers in Tamiyo or in the user's process (`controller="local"`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from esper.contracts.control import ControlDecision
from esper.contracts.envelope import Envelope
from esper.contracts.jobs import JobMetrics, SeedView
from esper.contracts.telemetry import TelemetryReport
from esper.contracts.vocabulary import Text

MAX_RUN_EVENTS = 1000
"""Events one report may carry: a decision point's few transitions, with room to spare."""
MAX_RUN_LOG_LINES = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RunReport(_Body):
    """What an external run measured and did since its last report, in the order it happened:
    `events` (its seeds' transitions and decisions' answers, as envelopes of event messages),
    then `report`. A decision point (`report.decision_point`) is answered in the reply."""

    report: TelemetryReport
    events: list[Envelope] = Field(default_factory=list, max_length=MAX_RUN_EVENTS)
    seeds: list[SeedView] = Field(
        default_factory=list, max_length=4096, description="every seed out of DORMANT, now"
    )
    logs: list[Text] = Field(default_factory=list, max_length=MAX_RUN_LOG_LINES)


class RunReply(_Body):
    """Tolaria's answer to a RunReport. `decisions`: at a decision point the controller's
    (in its order), then operators' sent to this job since the last point; to be executed
    before the run's next step. `answered`: whether the controller answered the point (false
    when it is not a point, no controller was alive, or none answered in
    `morphogenesis.decision_timeout_s`: the point is passed, `event.decision_point_missed`).
    `stop_requested`: a stop was asked through the API; the run should end (`run.should_stop`)."""

    decisions: list[ControlDecision] = Field(default_factory=list, max_length=1000)
    answered: bool = False
    note: Text | None = None
    stop_requested: bool = False


class RunEnd(_Body):
    """How an external run ended; `metrics` the last and best it measured, `seeds` its seeds."""

    status: Literal["SUCCEEDED", "FAILED", "STOPPED"]
    error: Text | None = None
    metrics: JobMetrics | None = None
    seeds: list[SeedView] = Field(default_factory=list, max_length=4096)
    steps: Annotated[int, Field(ge=0)] | None = None

"""Tamiyo's API bodies: the decision records (`GET /decisions`), an operator's decision, the
policy view. The job's controller state they sit beside is the policy's (`esper.policy.models`).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from esper.contracts import (
    Action,
    Blend,
    BlueprintName,
    ControlDecision,
    Identifier,
    Key,
    LayerName,
    Outcome,
    Reason,
    Scalar,
    SeedIndex,
    Tag,
    Unit,
)
from esper.contracts.control import Strategy
from esper.policy.config import PolicyConfig


# ------------------------------------------------------------------ API bodies
class DecisionRecord(BaseModel):
    """A published decision and, once the job answered, its outcome (`GET /decisions`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    decision: ControlDecision
    source: Literal["tamiyo", "operator"]
    policy: str = Field(description="the policy that made it, or 'operator'")
    trigger: str | None = Field(
        default=None,
        description="what triggered it: the envelope id of the telemetry report, or "
        "`point:kind:epoch:step` for a decision point's (the same in every run of the job)",
    )
    epoch: int | None = Field(default=None, description="the job's last reported epoch")
    created_at: float = Field(default_factory=time.time)
    outcome: Literal["published", Outcome] = "published"
    outcome_reason: str | None = None
    slot: int | None = Field(default=None, description="the seed slot the job used")


class ManualDecision(BaseModel):
    """`POST /jobs/{id}/decisions`: a ControlDecision without the job (it is in the path). A
    `decision_id` makes the request idempotent; without one Tamiyo makes one up."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    decision_id: Identifier | None = None
    action: Action
    layer: LayerName
    seed: SeedIndex | None = None
    blueprint: BlueprintName | None = None
    kernel: Tag | None = None
    blend: Blend | None = None
    strategy: Strategy | None = None
    ramp_steps: int = Field(default=0, ge=0, le=1_000_000)
    alpha: Unit | None = None
    reason: Reason = "operator decision"
    evidence: dict[Key, Scalar] = Field(default_factory=dict, max_length=64)


class PolicyView(BaseModel):
    """`GET /policy`: the policy every replica applies, and where it comes from."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyConfig
    source: Literal["defaults", "stored"] = Field(
        description="defaults: this replica's (nobody PUT a policy yet); stored: the PUT one"
    )
    updated_at: float | None = None

"""Control: what Tamiyo (or an operator) asks a training job to do with its seeds.

A decision is checked here, where it is made, rather than in the job that executes it: a
germinate without a blueprint, or a retire that names no seed, is refused before it travels.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from esper.contracts._schema import NULL, fields_are, when
from esper.contracts.envelope import Message, register
from esper.contracts.vocabulary import (
    Action,
    Blend,
    BlueprintName,
    Identifier,
    Key,
    LayerName,
    Reason,
    Scalar,
    SeedIndex,
    Tag,
    Unit,
)

Strategy = Literal["diversify", "specialize", "ensemble"]


@register
class ControlDecision(Message):
    """One decision for one seed slot of one job.

    - `germinate`: load a kernel into a slot (`seed`, or any free slot when None) and ramp α from
      0 to `alpha` (None: the orchestrator's default) over `ramp_steps`. The kernel is compiled
      from `blueprint` for this layer, or is an already published `kernel` (an id or a tag such as
      `efficiency_kernel_v1`: the hot-swap case); exactly one of the two.
    - `keep`: the seed earned its place; it stays ACTIVE.
    - `retire`: ramp α to 0 over `ramp_steps`, then RETIRING → RECYCLING → DORMANT.
    - `set_alpha`: ramp the seed's α to `alpha` over `ramp_steps` (0: at once).

    `decision_id` makes executing a decision idempotent; the job answers with an
    `event.decision_taken` that carries the same id.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when(
                    "action",
                    {"const": "germinate"},
                    {
                        "oneOf": [
                            {**fields_are(blueprint={"type": "string"}), "required": ["blueprint"]},
                            {**fields_are(kernel={"type": "string"}), "required": ["kernel"]},
                        ]
                    },
                ),
                when(
                    "action",
                    {"enum": ["keep", "retire", "set_alpha"]},
                    {
                        **fields_are(
                            seed={"type": "integer"},
                            blueprint=NULL,
                            kernel=NULL,
                            blend=NULL,
                            strategy=NULL,
                        ),
                        "required": ["seed"],
                    },
                ),
                when(
                    "action",
                    {"const": "set_alpha"},
                    {**fields_are(alpha={"type": "number"}), "required": ["alpha"]},
                ),
                when("action", {"enum": ["keep", "retire"]}, fields_are(alpha=NULL)),
            ]
        }
    )

    TYPE: ClassVar[str] = "control.decision"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "control"

    decision_id: Identifier
    job_id: Identifier
    action: Action
    layer: LayerName
    seed: SeedIndex | None = Field(default=None, description="null: any free slot (germinate)")
    blueprint: BlueprintName | None = None
    kernel: Tag | None = Field(default=None, description="a published kernel id or tag")
    blend: Blend | None = Field(default=None, description="null: the kernel's default blend")
    strategy: Strategy | None = None
    ramp_steps: int = Field(default=0, ge=0, le=1_000_000)
    alpha: Unit | None = None
    reason: Reason
    evidence: dict[Key, Scalar] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _fits_action(self) -> ControlDecision:
        act = self.action
        if act == "germinate":
            if (self.blueprint is None) == (self.kernel is None):
                raise ValueError("germinate needs a blueprint or a kernel (exactly one)")
        else:
            if self.seed is None:
                raise ValueError(f"{act} needs a seed index")
            for name in ("blueprint", "kernel", "blend", "strategy"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} only applies to germinate, not {act}")
        if act == "set_alpha" and self.alpha is None:
            raise ValueError("set_alpha needs an alpha target")
        if act in ("keep", "retire") and self.alpha is not None:
            raise ValueError(f"alpha does not apply to {act}")
        return self


@register
class ControlAnswer(Message):
    """The controller's answer to a job's decision point (a `telemetry.report` with
    `decision_point`): its decisions for that point, in the order to execute them, or none —
    an explicit "nothing", with `note` saying why — so the job never waits for what will not
    come. The point is named by `epoch`, `step` and `kind`, which a restarted job reaches again
    at the same place: answering the same point twice gives the same answer."""

    TYPE: ClassVar[str] = "control.answer"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "control"

    job_id: Identifier
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    kind: Literal["epoch", "step"]
    decisions: list[ControlDecision] = Field(default_factory=list, max_length=16)
    note: Reason = Field(description="what the controller made of the report, in words")

    @property
    def point(self) -> str:
        return f"{self.kind}:{self.epoch}:{self.step}"

    @model_validator(mode="after")
    def _decisions_are_for_this_job(self) -> ControlAnswer:
        for decision in self.decisions:
            if decision.job_id != self.job_id:
                raise ValueError(f"decision {decision.decision_id} is for another job")
        return self

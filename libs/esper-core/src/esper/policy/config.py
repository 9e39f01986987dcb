"""The policy configuration: every threshold the heuristic policy uses, with its default.

In-process, a training loop passes its own `PolicyConfig`. Hosted by Tamiyo, it is what
`GET /policy` shows and `PUT /policy` replaces; it is stored in Redis, so every Tamiyo replica
applies the same one. Until someone PUTs one, each replica uses the defaults below, each
overridable by an environment variable `TAMIYO_<FIELD>` (`TAMIYO_WARMUP_EPOCHS=2`,
`TAMIYO_BLUEPRINTS='["residual_mlp"]'`; Tamiyo's settings). services/tamiyo/README.md explains
every field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esper.contracts import Blend, BlueprintName
from esper.contracts.control import Strategy

LayerSignal = Literal["gradient", "activation_variance"]

MAX_WINDOW = 64
"""The longest loss window (overfit_patience, train_stall_epochs): the job's state keeps that
many epochs of losses, at most, in every job's state."""

PREFERENCE: tuple[str, ...] = (
    "widen",
    "residual_mlp",
    "wide_mlp",
    "bottleneck",
    "gated_linear_unit",
    "conv3x3",
    "depthwise_separable",
    "squeeze_excite",
    "low_rank",
    "norm_scale",
)
"""The order blueprints are tried in when `blueprints` is not set: the ones that add nonlinear
capacity first (what an underfitting model lacks), the reparameterisations (`low_rank`,
`norm_scale`) last. Blueprints registered in Urza but not listed here follow, by name."""


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(
        default=True, description="false: Tamiyo keeps watching and recording, decides nothing"
    )
    warmup_epochs: int = Field(
        default=3,
        ge=0,
        le=100_000,
        description="no germination before the report of this epoch (epochs count from 0)",
    )
    patience: int = Field(
        default=3,
        ge=1,
        le=100_000,
        description="a plateau: this many epoch reports in a row without a new best val_loss",
    )
    min_delta: float = Field(
        default=0.005,
        ge=0.0,
        le=1e9,
        description="absolute, in the val_loss's own units: a val_loss counts as a new best only "
        "when it beats the best by more than this",
    )
    layer_signal: LayerSignal = Field(
        default="gradient",
        description="which telemetry signal ranks the layers (see the README for why)",
    )
    signal_smoothing: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="a fraction in [0, 1): weight of the running average when a new layer "
        "measurement arrives (0: only the latest report counts)",
    )
    skip_output_layer: bool = Field(
        default=True,
        description="never grow the last wrapped layer (the classifier) when there are others",
    )
    strategy: Strategy = Field(
        default="diversify",
        description="how the blueprint is chosen: diversify, specialize or ensemble",
    )
    bottleneck_ratio: float | None = Field(
        default=2.0,
        gt=1.0,
        le=1000.0,
        description="grow before any plateau when, on a layer the job can widen, new hidden "
        "units would get at least this many times the gradient of the layer's own weights "
        "(growth_gain / grad_norm, averaged like the layer signal): a layer too narrow for what "
        "the loss asks of it (null: off)",
    )
    prefer_widening: bool = Field(
        default=True,
        description="on a layer the job can widen (one followed by another through an "
        "activation), a widening blueprint goes first whatever the strategy: new hidden units "
        "where the layer is narrow, before branches around it; another is chosen once widening "
        "has failed max_blueprint_failures times",
    )
    blueprints: list[BlueprintName] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="the blueprints Tamiyo may use, in order of preference (null: every "
        "blueprint Urza has, in the built-in preference order)",
    )
    blend: Blend | None = Field(
        default=None, description="blend of germinated seeds (null: the blueprint's default_blend)"
    )
    ramp_steps: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="training steps over which α ramps up at germination",
    )
    target_alpha: float = Field(
        default=1.0, gt=0.0, le=1.0, description="the α a germinated seed ramps to"
    )
    evaluation_epochs: int = Field(
        default=3,
        ge=1,
        le=100_000,
        description="epochs a seed trains at full α before its contribution is judged",
    )
    keep_threshold: float = Field(
        default=0.01,
        ge=-1.0,
        le=1.0,
        description="validation accuracy, a fraction (0.01: one point): keep a seed whose "
        "measured contribution (validation accuracy with the seed minus with its α forced to 0) "
        "is at least this; retire it otherwise",
    )
    retire_ramp_steps: int = Field(
        default=50,
        ge=0,
        le=1_000_000,
        description="training steps over which α ramps to 0 at retirement",
    )
    cooldown_epochs: int = Field(
        default=2,
        ge=0,
        le=100_000,
        description="epoch reports without germination after a retirement or a refused germination",
    )
    retry_cooldown_epochs: int = Field(
        default=1,
        ge=0,
        le=100_000,
        description="epochs without germination after a germination refused for a cause that "
        "may pass (Urza unreachable: `kernel_unreachable`), which charges no blueprint; "
        "0: the next epoch report may germinate again",
    )
    max_seeds_per_job: int = Field(
        default=4,
        ge=0,
        le=4096,
        description="germinate only while the job holds fewer live (non-DORMANT) seeds than this",
    )
    max_blueprint_failures: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="a blueprint refused, failed or retired this many times in a job is not "
        "chosen again for that job",
    )
    decision_timeout_epochs: int = Field(
        default=3,
        ge=1,
        le=100_000,
        description="a germination the job has not answered after this many epoch reports is "
        "given up (so a lost message cannot block the job for ever)",
    )
    overfit_patience: int = Field(
        default=3,
        ge=1,
        le=MAX_WINDOW,
        description="epoch reports (a window): the job overfits when, over this many epoch "
        "reports, its val_loss rose and its train_loss fell and the gap between them widened "
        "by more than overfit_gap; no germination while it overfits",
    )
    overfit_gap: float = Field(
        default=0.1,
        ge=0.0,
        le=1e6,
        description="relative, a fraction of the val_loss where the rise began: how much the "
        "gap val_loss − train_loss must widen over overfit_patience epoch reports to count as "
        "overfitting (0.1: by a tenth of that val_loss)",
    )
    train_stall_epochs: int = Field(
        default=5,
        ge=1,
        le=MAX_WINDOW,
        description="epoch reports (a window): a train_loss that improved by less than "
        "train_stall_delta over this many epoch reports since the model last changed has "
        "stalled: the job underfits and may grow before its val_loss plateaus",
    )
    train_stall_delta: float = Field(
        default=0.03,
        ge=0.0,
        le=1.0,
        description="relative, a fraction of the train_loss at the start of the window: the "
        "least improvement over train_stall_epochs epoch reports that is not a stall "
        "(0.03: 3 %; 0: only a train_loss that rose is a stall)",
    )
    max_unpaid_germinations: int = Field(
        default=3,
        ge=1,
        le=100_000,
        description="germinations in a row (counted at their verdicts) that did not pay — "
        "retired, or kept with a contribution below keep_threshold — after which Tamiyo stops "
        "germinating for the job; a germination that pays resets the count",
    )
    rejudge_threshold: float = Field(
        default=0.005,
        ge=-1.0,
        le=1.0,
        description="validation accuracy (a fraction, like keep_threshold): a kept seed whose "
        "measured contribution stays below this for rejudge_epochs epoch reports in a row no "
        "longer pays and is retired",
    )
    rejudge_epochs: int = Field(
        default=3,
        ge=1,
        le=100_000,
        description="epoch reports in a row with a kept seed's measured contribution below "
        "rejudge_threshold before it is retired (a report without a measurement neither counts "
        "nor breaks the run)",
    )

    @field_validator("blueprints")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a blueprint is listed twice")
        return value

"""The policy configuration: every threshold the heuristic policy uses, with its default.

`PolicyConfig` is what `GET /policy` shows and `PUT /policy` replaces; it is stored in Redis, so
every Tamiyo replica applies the same one. Until someone PUTs one, each replica uses the defaults
below, each overridable by an environment variable `TAMIYO_<FIELD>` (`TAMIYO_WARMUP_EPOCHS=2`,
`TAMIYO_BLUEPRINTS='["residual_mlp"]'`). The README explains every field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.contracts import Blend, BlueprintName
from esper.contracts.control import Strategy

LayerSignal = Literal["gradient", "activation_variance"]

PREFERENCE: tuple[str, ...] = (
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
        description="a val_loss counts as a new best only when it beats the best by more than this",
    )
    layer_signal: LayerSignal = Field(
        default="gradient",
        description="which telemetry signal ranks the layers (see the README for why)",
    )
    signal_smoothing: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="weight of the running average when a new layer measurement arrives "
        "(0: only the latest report counts)",
    )
    skip_output_layer: bool = Field(
        default=True,
        description="never grow the last wrapped layer (the classifier) when there are others",
    )
    strategy: Strategy = Field(
        default="diversify",
        description="how the blueprint is chosen: diversify, specialize or ensemble",
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
        default=100, ge=1, le=1_000_000, description="steps over which α ramps up at germination"
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
        description="keep a seed whose measured contribution (validation accuracy with the seed "
        "minus with its α forced to 0) is at least this; retire it otherwise",
    )
    retire_ramp_steps: int = Field(
        default=50, ge=0, le=1_000_000, description="steps over which α ramps to 0 at retirement"
    )
    cooldown_epochs: int = Field(
        default=2,
        ge=0,
        le=100_000,
        description="epochs without germination after a retirement or a refused germination",
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

    @field_validator("blueprints")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a blueprint is listed twice")
        return value


class PolicyDefaults(PolicyConfig, BaseSettings):
    """The defaults of this replica: PolicyConfig's, overridden by `TAMIYO_<FIELD>` variables."""

    model_config = SettingsConfigDict(env_prefix="TAMIYO_", extra="ignore", frozen=True)


def policy_from_env() -> PolicyConfig:
    return PolicyConfig.model_validate(PolicyDefaults().model_dump())

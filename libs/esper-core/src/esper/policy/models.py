"""The controller state of a job: what the bookkeeping (tracking.py) and the policy read and
write. Tamiyo keeps it in Redis and shows it at `GET /jobs/{id}/controller`; an in-process
controller keeps it in memory.

The state models are mutable on purpose: each handling of a message takes the job's state (in
Tamiyo, a fresh copy parsed from Redis, written back with compare-and-set), and the bookkeeping
and the policy update it in place.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    Blend,
    ControlAnswer,
    Identifier,
    JobStatus,
    LayerName,
    SeedIndex,
    SeedStateName,
)
from esper.contracts.jobs import HostKind

Origin = Literal["tamiyo", "operator", "unknown"]
"""Who germinated a seed: Tamiyo, an operator through Tamiyo's API, or someone Tamiyo does not
know of (a seed it only saw in telemetry). Tamiyo judges only the seeds it knows the origin of."""
Verdict = Literal["keep", "retire"]


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=False)


class LayerView(_State):
    """One wrapped layer as Tamiyo last saw it in the job's telemetry."""

    order: int = Field(ge=0, description="position in the job's telemetry; the last is the output")
    kind: HostKind | None = Field(
        default=None,
        description="linear, conv2d or conv1d: as v3 telemetry says it, else learnt from the "
        "kernels of the layer's seeds",
    )
    activation_mean: float | None = None
    activation_variance: float | None = None
    dead_fraction: float | None = None
    grad_norm: float | None = None
    stats_step: int | None = Field(default=None, description="the step the statistics are from")
    gradient_score: float | None = Field(
        default=None, description="running average of grad_norm × (1 − dead_fraction)"
    )
    gain_score: float | None = Field(
        default=None,
        description="running average of growth_gain (layers the job can widen, on sampled steps)",
    )
    bottleneck_score: float | None = Field(
        default=None,
        description="running average of growth_gain / grad_norm: how many times the gradient "
        "of the layer's own weights new units between it and its next layer would get",
    )
    variance_score: float | None = Field(
        default=None, description="running average of activation_variance × (1 − dead_fraction)"
    )
    next_layer: LayerName | None = Field(
        default=None,
        description="the layer a widening seed of this one adds to, as the job reports it "
        "(None: this layer cannot be widened)",
    )
    failures: int = Field(
        default=0, description="seeds of this layer retired, or gone before their verdict"
    )
    full: bool = Field(
        default=False,
        description="the job refused a germination here for want of a free slot; cleared when "
        "a seed of this layer leaves",
    )


class SeedTrack(_State):
    """A non-DORMANT seed of the job, and what Tamiyo knows and decided about it."""

    layer: LayerName
    seed: SeedIndex
    state: SeedStateName
    alpha: float = 0.0
    kernel_id: str | None = None
    blend: Blend = "add"
    contribution: float | None = None
    contribution_epoch: int | None = None
    error_count: int = 0
    origin: Origin = "unknown"
    decision_id: str | None = None
    blueprint: str | None = None
    target_alpha: float | None = None
    germinated_epoch: int | None = None
    ramp_done_epoch: int | None = Field(
        default=None, description="first epoch report that showed α at its target"
    )
    verdict: Verdict | None = None
    verdict_epoch: int | None = None
    seen_epoch: int | None = Field(default=None, description="last epoch report that listed it")
    alphas: list[tuple[int, float]] = Field(
        default_factory=list,
        description="(epoch, α) of the last few epoch reports that listed it, so a ramp that "
        "ended before Tamiyo learned the seed's target is still dated right",
    )
    last_step: int | None = Field(default=None, description="step of the last transition applied")
    low_epochs: int = Field(
        default=0,
        description="kept: epoch reports in a row since its keep whose measured contribution "
        "was below rejudge_threshold",
    )


class Pending(_State):
    """A germination published and not answered by the job yet."""

    decision_id: str
    layer: LayerName
    seed: SeedIndex | None
    blueprint: str | None
    kernel: str | None = None
    origin: Origin
    epoch: int | None = Field(description="the job's last reported epoch when it was published")
    target_alpha: float
    best_val_loss: float | None = Field(
        default=None,
        description="the plateau when it was published, to resume it if the job "
        "could not apply it for a cause that may pass",
    )
    stale_epochs: int = 0
    model_epoch: int | None = Field(
        default=None, description="the model's last change when it was published (see JobState)"
    )


class BlueprintRecord(_State):
    """How one blueprint fared in this job."""

    tried: int = 0
    failures: int = Field(default=0, description="refused, failed (went DORMANT early) or retired")
    kept: int = 0
    retired: int = 0
    best_contribution: float | None = None
    last_contribution: float | None = None


class EpochLosses(_State):
    """One epoch report's losses (None: not measured)."""

    epoch: int
    train_loss: float | None
    val_loss: float | None


class Overfit(_State):
    """Why Tamiyo holds the job overfitting: over `epochs` epoch reports up to `epoch`, the
    val_loss rose from `val_from` and the train_loss fell from `train_from`, and the gap between
    them widened. It stands until the val_loss comes back down to `val_from`."""

    since_epoch: int = Field(description="the epoch report that found it")
    epochs: int = Field(description="the window it was found over (overfit_patience)")
    val_from: float
    train_from: float
    epoch: int = Field(description="the latest epoch report, which it still stands at")
    val_loss: float
    train_loss: float | None


class JobState(_State):
    """The controller state of one job (`GET /jobs/{id}/controller`)."""

    job_id: Identifier
    version: int = Field(default=0, description="incremented by every write (compare-and-set)")
    known: bool = Field(
        default=False,
        description="Tamiyo saw the job start (its RUNNING event or its epoch-0 report); it "
        "decides only for known jobs",
    )
    status: JobStatus | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    last_epoch: int | None = Field(default=None, description="last epoch report handled")
    last_step: int | None = Field(default=None, description="last step report handled")
    val_loss: float | None = None
    val_accuracy: float | None = None
    best_val_loss: float | None = None
    stale_epochs: int = Field(default=0, description="epoch reports since the last new best")
    losses: list[EpochLosses] = Field(
        default_factory=list,
        description="the last epoch reports' losses (as many as the longer loss window needs)",
    )
    model_epoch: int | None = Field(
        default=None,
        description="the epoch report after which the model last changed (a germination or a "
        "verdict): the train_loss stall is measured from it",
    )
    overfit: Overfit | None = Field(
        default=None, description="the job overfits: no germination while this stands"
    )
    unpaid_germinations: int = Field(
        default=0,
        description="germinations in a row, by their verdicts, that did not pay (retired, or "
        "kept below keep_threshold); at max_unpaid_germinations Tamiyo stops growing the job",
    )
    layers: dict[str, LayerView] = Field(default_factory=dict)
    seeds: list[SeedTrack] = Field(default_factory=list)
    pending: Pending | None = None
    abandoned: Pending | None = Field(
        default=None,
        description="the last germination given up unanswered; a late answer still adopts it",
    )
    cooldown_until: int | None = Field(
        default=None, description="no germination in epoch reports up to this epoch"
    )
    seed_cap: int | None = Field(
        default=None, description="the job's own max_seeds, learned from a refusal"
    )
    morphogenesis_off: bool = Field(
        default=False, description="the job refused a germination: morphogenesis is off"
    )
    blueprints: dict[str, BlueprintRecord] = Field(default_factory=dict)
    germinations: int = 0
    decisions: list[str] = Field(default_factory=list, description="recent decision ids")
    note: str = Field(default="", description="what Tamiyo did, or why it did not act, last")
    points: bool = Field(
        default=False,
        description="the job asks at decision points (its first one came): only its points "
        "feed the policy, and Tamiyo's decisions reach it only in answers",
    )
    answers: dict[str, ControlAnswer] = Field(
        default_factory=dict,
        description="the answers to the job's last decision points (the last MAX_ANSWERS, "
        "oldest first), by point `kind:epoch:step`: a point asked again (a job resumed from a "
        "checkpoint, a redelivery) gets the same answer",
    )

    def track(self, layer: str, seed: int) -> SeedTrack | None:
        return next((s for s in self.seeds if s.layer == layer and s.seed == seed), None)

    def live_seeds(self) -> int:
        return len(self.seeds)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

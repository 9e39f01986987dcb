"""Telemetry: what a training job measured, per epoch or every K steps.

A report marked `decision_point` is also a question: the job waits (bounded) for the
controller's `control.answer` to it before its next step, and applies that answer there, so the
same job decides the same things at the same steps whatever the machine's load. It carries the
job's answers to the decisions it executed since its previous report, so the controller reads
them in the job's order rather than in whatever order two streams are read.

Tamiyo decides from it and Nissa exports it, so an unmeasured value is `None`, never 0: a dead-unit
fraction of 0 means "every unit fires", and a missing gradient norm must not look like a calm one.
A metric that was measured but came out NaN or infinite is `None` here and named in `nonfinite`,
so a diverging run is reported as diverging rather than as silent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import ClassVar, Literal, Self, get_args

from pydantic import ConfigDict, Field, model_validator

from esper.contracts._schema import NULL, Part, fields_are, when
from esper.contracts.envelope import Message, register
from esper.contracts.events import DecisionTaken
from esper.contracts.vocabulary import (
    Blend,
    Count,
    Identifier,
    KernelId,
    LayerName,
    NonNegative,
    SeedIndex,
    SeedStateName,
    Unit,
)

Metric = Literal["train_loss", "val_loss", "val_accuracy", "samples_per_s"]
MAX_LAYERS = 1024


def finite_or_none(value: float | None) -> float | None:
    """A measured value as a contract field wants it: NaN and ±inf (StateLayout's "not measured
    yet" contribution, a diverged loss) become None."""
    return value if value is not None and math.isfinite(value) else None


class _LayerFields(Part):
    """What every version of a layer's statistics carries."""

    layer: LayerName
    activation_mean: float | None = None
    activation_variance: NonNegative | None = None
    dead_fraction: Unit | None = Field(
        default=None, description="fraction of output units that never activated in the window"
    )
    grad_norm: NonNegative | None = Field(
        default=None, description="L2 norm of the host layer's parameter gradients"
    )


class LayerStatsV2(_LayerFields):
    """One wrapped layer's statistics over the reporting window, as `telemetry.report` v1 and v2
    carry them: they do not say whether the layer can be widened."""


class LayerStats(_LayerFields):
    """One wrapped layer's statistics over the reporting window."""

    next_layer: LayerName | None = Field(
        default=None,
        description="the next host layer, fed this layer's output through an elementwise "
        "activation only: a widening seed of this layer adds its hidden units between the two "
        "(None: this layer cannot be widened)",
    )
    kind: Literal["linear", "conv2d", "conv1d"] | None = Field(
        default=None,
        description="the host layer's kind, which decides the blueprints that fit it (None: "
        "not said, as in v1 and v2 reports)",
    )
    growth_gain: NonNegative | None = Field(
        default=None,
        description="what new hidden units between this layer and `next_layer` could gain: "
        "‖Σ ∂L/∂y_next · xᵀ‖_F over a sampled step's batch (x this layer's input, y_next the "
        "next layer's output), the gradient a widening seed's fan-out gets at birth along the "
        "best directions, on the scale of grad_norm; None when not measured (no next layer, a "
        "conv layer, no sampled step)",
    )

    @model_validator(mode="after")
    def _not_itself(self) -> LayerStats:
        if self.next_layer == self.layer:
            raise ValueError(f"layer {self.layer!r} names itself as its next layer")
        return self


class SeedStats(Part):
    """One seed slot's state; `contribution` is None until it has been measured."""

    layer: LayerName
    seed: SeedIndex
    state: SeedStateName
    alpha: Unit
    kernel_id: KernelId | None = None
    blend: Blend = "add"
    contribution: float | None = Field(
        default=None,
        description="validation metric with the seed minus with its alpha forced to 0",
    )
    error_count: Count = 0


class _ReportFields(Message):
    """What every version of `telemetry.report` carries."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when("nonfinite", {"contains": {"const": m}}, fields_are(**{m: NULL}))
                for m in get_args(Metric)
            ]
        }
    )

    TYPE: ClassVar[str] = "telemetry.report"
    TOPIC: ClassVar[str] = "telemetry"

    job_id: Identifier
    epoch: Count
    step: Count
    kind: Literal["epoch", "step"]
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: Unit | None = None
    samples_per_s: NonNegative | None = None
    # Each version names the LayerStats it carries: v3 added `next_layer`.
    layers: Sequence[_LayerFields] = Field(default_factory=list, max_length=MAX_LAYERS)
    seeds: list[SeedStats] = Field(default_factory=list, max_length=4096)
    nonfinite: list[Metric] = Field(
        default_factory=list,
        max_length=4,
        description="metrics that were measured but were NaN or infinite (reported as null)",
    )


@register
class TelemetryReportV1(_ReportFields):
    """`telemetry.report` v1: no decision points. Still read; `upgrade()` gives a report that
    asks nothing, whose layers cannot be widened."""

    VERSION: ClassVar[int] = 1

    layers: list[LayerStatsV2] = Field(default_factory=list, max_length=MAX_LAYERS)

    def upgrade(self) -> TelemetryReport:
        return TelemetryReport(**self.model_dump())


class _AskingReportFields(_ReportFields):
    """What every version of `telemetry.report` since decision points carries."""

    decision_point: bool = Field(
        default=False,
        description="the job waits for the controller's control.answer to this report and "
        "applies it before its next step",
    )
    answers: list[DecisionTaken] = Field(
        default_factory=list,
        max_length=256,
        description="the job's answers to the decisions it executed since its previous report",
    )

    @property
    def point(self) -> str:
        """The decision point this report is, named by where it happened in training: the same
        in every run of the job, and after a restart."""
        return f"{self.kind}:{self.epoch}:{self.step}"

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for name in self.nonfinite:
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is listed as non-finite but has a value")
        layers = [s.layer for s in self.layers]
        if len(set(layers)) != len(layers):
            raise ValueError("layers: a layer appears more than once")
        slots = [(s.layer, s.seed) for s in self.seeds]
        if len(set(slots)) != len(slots):
            raise ValueError("seeds: a (layer, seed) slot appears more than once")
        return self


@register
class TelemetryReportV2(_AskingReportFields):
    """`telemetry.report` v2: decision points, but its layers do not say whether they can be
    widened. Still read; `upgrade()` gives a report whose layers cannot be."""

    VERSION: ClassVar[int] = 2

    layers: list[LayerStatsV2] = Field(default_factory=list, max_length=MAX_LAYERS)

    def upgrade(self) -> TelemetryReport:
        return TelemetryReport(**self.model_dump())


@register
class TelemetryReport(_AskingReportFields):
    """A job's metrics at one point of training (`kind` says whether an epoch or a step ended)."""

    VERSION: ClassVar[int] = 3

    layers: list[LayerStats] = Field(default_factory=list, max_length=MAX_LAYERS)

    @classmethod
    def from_measurements(
        cls,
        *,
        job_id: str,
        epoch: int,
        step: int,
        kind: Literal["epoch", "step"],
        metrics: dict[Metric, float | None],
        layers: Iterable[LayerStats] = (),
        seeds: Iterable[SeedStats] = (),
        decision_point: bool = False,
        answers: Iterable[DecisionTaken] = (),
    ) -> TelemetryReport:
        """Build a report from raw measurements: a NaN or infinite metric becomes None and is
        named in `nonfinite` instead of making the report invalid."""
        clean = {name: finite_or_none(value) for name, value in metrics.items()}
        bad = [n for n, v in metrics.items() if v is not None and clean[n] is None]
        return cls(
            job_id=job_id,
            epoch=epoch,
            step=step,
            kind=kind,
            **clean,
            layers=list(layers),
            seeds=list(seeds),
            nonfinite=sorted(bad),
            decision_point=decision_point,
            answers=list(answers),
        )

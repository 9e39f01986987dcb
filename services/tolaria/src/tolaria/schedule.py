"""Growth on a fixed schedule (`morphogenesis.controller: schedule`): the germinations the spec
lists, each at the decision point that ends its epoch, with no controller asked. A control arm
for benchmarks: the same blueprints at fixed epochs, so what a controller adds can be measured.

The schedule answers a point the way a controller would, so the rest of the flow (execution,
answers in the next report, checkpoints, operators' decisions) is the same for both.
"""

from __future__ import annotations

from esper.contracts import ControlAnswer, ControlDecision, JobSpec, TelemetryReport
from esper.contracts.jobs import MorphogenesisSpec
from tolaria.errors import SpecError

_SCHEDULE = ["spec", "morphogenesis", "schedule"]


def scheduled_answer(spec: MorphogenesisSpec, report: TelemetryReport) -> ControlAnswer:
    """The schedule's decisions for the point `report` asks: the entries of its epoch, in the
    spec's order, at the epoch's own point (a step point gets none)."""
    decisions = [
        ControlDecision(
            decision_id=f"sched-{entry.epoch}-{index}",
            job_id=report.job_id,
            action="germinate",
            layer=entry.layer,
            seed=entry.seed,
            blueprint=entry.blueprint,
            ramp_steps=spec.ramp_steps,
            reason=f"scheduled at the end of epoch {entry.epoch}",
        )
        for index, entry in enumerate(spec.schedule)
        if report.kind == "epoch" and entry.epoch == report.epoch
    ]
    return ControlAnswer(
        job_id=report.job_id,
        epoch=report.epoch,
        step=report.step,
        kind=report.kind,
        decisions=decisions,
        note=f"schedule: {len(decisions)} germination(s) at this point",
    )


def check_schedule(spec: JobSpec, layers: list[str] | None) -> None:
    """Raises SpecError at the first schedule entry the job could not execute. `layers`: the
    layers the job wraps (None: morphogenesis is off)."""
    morph = spec.morphogenesis
    if not morph.schedule:
        return
    if layers is None:
        raise SpecError(_SCHEDULE, "morphogenesis is off: nothing can be germinated")
    if morph.controller != "schedule":
        raise SpecError(
            _SCHEDULE,
            "a schedule is executed only with no controller: set morphogenesis.controller: "
            "schedule (or remove the schedule to let Tamiyo decide)",
        )
    last = spec.training.epochs - 1
    for i, entry in enumerate(morph.schedule):
        if entry.layer not in layers:
            raise SpecError(
                [*_SCHEDULE, i, "layer"],
                f"{entry.layer!r} is not a wrapped layer; the job wraps {layers}",
            )
        if entry.epoch >= last:
            # The last epoch has no decision point: nothing would train after its growth.
            raise SpecError(
                [*_SCHEDULE, i, "epoch"],
                f"epoch {entry.epoch} is not before the last epoch ({last}, 0-based, of "
                f"training.epochs {spec.training.epochs}): growth there would never train",
            )
        if entry.seed is not None and entry.seed >= morph.seeds_per_layer:
            raise SpecError(
                [*_SCHEDULE, i, "seed"],
                f"seed {entry.seed} is not a slot: layers have {morph.seeds_per_layer} "
                "(morphogenesis.seeds_per_layer)",
            )

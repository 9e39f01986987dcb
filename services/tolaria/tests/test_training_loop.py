"""The job's step loop in this process: a JobTrainer on a real JobRuntime and a real Redis, with
no job process around it. What an epoch reports, and how the loop reacts to what happens between
two steps: a stop, an operator's decision (held for the next decision point), a seed that is
loaded, ramps and retires."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from jobhelpers import started
from torch import nn

import esper
from esper.bus import FIELD
from esper.contracts import (
    ControlDecision,
    DecisionTaken,
    Envelope,
    JobSpec,
    Message,
    TelemetryReport,
)
from esper.kasmina import SeedState
from esper.kernels import KernelCache
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer, StopRequested

JOB = "loop-test"
SPEC = {
    "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
    "dataset": {"kind": "circles", "samples": 600},
    "training": {"batch_size": 32, "lr": 0.01, "telemetry_every_steps": 5},
}


class RecordingLoss(nn.CrossEntropyLoss):
    """Cross-entropy that keeps each batch's value, to check what the epoch reports."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = super().forward(input, target)
        self.values.append(float(loss.detach()))
        return loss


@pytest.fixture
def runtime(settings: TolariaSettings) -> Iterator[JobRuntime]:
    with started(settings, JOB) as job_runtime:
        yield job_runtime


def trainer_for(runtime: JobRuntime) -> JobTrainer:
    spec = JobSpec.model_validate(SPEC)
    settings = runtime.settings
    trainer = JobTrainer(runtime, spec, settings.data_dir, settings.work_dir)
    runtime.call(runtime.store.create(JOB, spec))
    return trainer


def wait_for_wakeup(runtime: JobRuntime, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not runtime.wakeups:
        assert time.monotonic() < deadline, "the bus loop never woke the training loop"
        time.sleep(0.01)


def held(runtime: JobRuntime) -> list[ControlDecision]:
    return runtime.call(runtime.store.held_decisions(JOB))


def epoch_report(runtime: JobRuntime, epoch: int) -> TelemetryReport:
    """The epoch's report, from the job's own event stream."""
    runtime.flush()

    async def read() -> list[Message]:
        entries = await runtime.redis.xrange(runtime.store.events_key(JOB))
        return [Envelope.decode((fields or {})[FIELD]).message() for _, fields in entries or []]

    reports = runtime.call(read())
    [report] = [
        r
        for r in reports
        if isinstance(r, TelemetryReport) and r.kind == "epoch" and r.epoch == epoch
    ]
    return report


def test_an_epoch_reports_the_mean_of_its_batch_losses(runtime: JobRuntime) -> None:
    trainer = trainer_for(runtime)
    trainer.loss_fn = RecordingLoss()
    mean, samples_per_s = trainer.train_epoch(0)
    values = trainer.loss_fn.values
    assert len(values) == -(-len(trainer.data.train_y) // 32)
    assert mean == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert samples_per_s > 0
    assert trainer.progress.step == len(values)


def test_a_stop_request_stops_the_epoch_before_its_next_step(runtime: JobRuntime) -> None:
    trainer = trainer_for(runtime)
    trainer.train_epoch(0)
    steps = trainer.progress.step
    runtime.call(runtime.store.request_stop(JOB))
    wait_for_wakeup(runtime)
    with pytest.raises(StopRequested):
        trainer.train_epoch(1)
    assert trainer.progress.step == steps  # not one step more


def test_an_operators_decision_waits_in_the_inbox_for_the_next_decision_point(
    runtime: JobRuntime,
) -> None:
    """Operators' decisions do not wake the step loop: held in the job's inbox, they wait for
    the epoch's decision point. This runtime has no Urza, so the germination is refused with
    the reason; what matters here is where it was answered, and that it left the inbox."""
    trainer = trainer_for(runtime)
    points = trainer.points
    assert points is not None
    decision = ControlDecision(
        decision_id="d-loop-1",
        job_id=JOB,
        action="germinate",
        layer="2",
        blueprint="residual_mlp",
        reason="test",
    )
    runtime.call(runtime.producer.publish(Envelope.wrap(decision, source="test")))
    deadline = time.monotonic() + 10
    while not held(runtime):
        assert time.monotonic() < deadline, "the decision never reached the job's inbox"
        time.sleep(0.01)
    assert held(runtime) == [decision]

    loss, samples_per_s = trainer.train_epoch(0)
    assert not runtime.wakeups
    assert not points.unreported and not runtime.decisions.empty()  # not executed mid-epoch
    assert held(runtime) == [decision]

    trainer.end_epoch(0, loss, samples_per_s)
    [outcome] = points.unreported
    assert isinstance(outcome, DecisionTaken)
    assert (outcome.decision_id, outcome.outcome) == ("d-loop-1", "refused")
    assert "no Urza is configured" in outcome.reason
    assert outcome.code == "kernel_unavailable"
    assert runtime.decisions.empty()
    assert held(runtime) == []
    assert trainer.progress.step == -(-len(trainer.data.train_y) // 32)

    loss, samples_per_s = trainer.train_epoch(1)
    trainer.end_epoch(1, loss, samples_per_s)
    assert epoch_report(runtime, 1).answers == [outcome]
    assert epoch_report(runtime, 0).answers == []
    assert not points.unreported


def test_a_loaded_seed_ramps_each_step_and_a_finished_retirement_leaves_the_optimizer(
    runtime: JobRuntime,
) -> None:
    trainer = trainer_for(runtime)
    morphable = trainer.morphable
    assert morphable is not None and morphable.all_dormant
    registry = esper.LocalKernelRegistry()
    meta = registry.compile("residual_mlp", morphable.layer("2").base_layer)
    morphable.kernels = KernelCache([registry])
    morphable.load_kernel_sync("2", 0, meta.kernel_id)
    assert not morphable.all_dormant
    steps = -(-len(trainer.data.train_y) // 32)
    morphable.ramp_seed_alpha("2", 0, 0.5, steps=steps)
    trainer.train_epoch(0)
    assert morphable.layer("2").seed_info(0).alpha == pytest.approx(0.5)
    groups = [g["name"] for g in trainer.optimizer.param_groups]
    assert groups == ["host", "seed:2:0"]

    morphable.retire_seed("2", 0, ramp_steps=3)
    trainer.train_epoch(1)
    assert morphable.layer("2").seed_info(0).state is SeedState.DORMANT
    assert morphable.all_dormant
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["host"]

"""The best epoch (`training.keep_best`), growth on a fixed schedule (`controller: schedule`) and
the model's cost in the job's metrics. A real JobRuntime and JobTrainer on a real Redis; kernels
are compiled in this process (LocalKernelProvider) where a job would ask Urza."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from jobhelpers import started

import esper
from esper.bus import FIELD
from esper.contracts import DecisionPointMissed, DecisionTaken, Envelope, JobSpec, Message
from esper.kernels import KernelCache
from esper.training import LocalKernelProvider
from tolaria import checkpoint
from tolaria.datasets import load_dataset
from tolaria.models import build_model, morphable_layers
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer

JOB = "best-test"
EPOCHS = 6
STEPS = 14
"""Steps an epoch: 600 samples leave 420 to train on, in batches of 32."""


def spec_with(training: dict[str, Any] | None = None, **morphogenesis: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
            "dataset": {"kind": "spirals", "samples": 600, "noise": 0.1, "seed": 1},
            "training": {"batch_size": 32, "lr": 0.1, "epochs": EPOCHS, **(training or {})},
            "morphogenesis": {"ramp_steps": 10, **morphogenesis},
        }
    )


SCHEDULED = spec_with(
    controller="schedule",
    schedule=[
        {"epoch": 1, "layer": "2", "blueprint": "residual_mlp"},
        {"epoch": 1, "layer": "0", "blueprint": "residual_mlp", "seed": 1},
    ],
)


def trainer_for(
    runtime: JobRuntime,
    spec: JobSpec,
    *,
    create: bool = True,
    registry: esper.LocalKernelRegistry | None = None,
) -> JobTrainer:
    """A job whose blueprints compile in this process, into `registry`, and whose model loads
    them from there (the registry plays Urza and the shared Redis tier across processes)."""
    settings = runtime.settings
    trainer = JobTrainer(runtime, spec, settings.data_dir, settings.work_dir)
    if create:
        runtime.call(runtime.store.create(JOB, spec))
    if trainer.morphable is not None and trainer.orchestrator is not None:
        registry = registry if registry is not None else esper.LocalKernelRegistry()
        trainer.morphable.kernels = KernelCache([registry])
        trainer.orchestrator.provider = LocalKernelProvider(registry)
    return trainer


def epochs(trainer: JobTrainer, first: int, last: int) -> list[int | None]:
    """Train epochs first..last-1; the epoch `best.pt` names after each (None: no file)."""
    seen: list[int | None] = []
    for epoch in range(first, last):
        loss, samples_per_s = trainer.train_epoch(epoch)
        trainer.end_epoch(epoch, loss, samples_per_s)
        state = checkpoint.load(trainer.best.path)
        seen.append(None if state is None else state["epoch"])
    return seen


def improving(history: list[dict[str, Any]]) -> list[int]:
    """The epochs whose validation accuracy beat every earlier one, strictly."""
    best, found = -1.0, []
    for row in history:
        if row["val_accuracy"] > best:
            best = row["val_accuracy"]
            found.append(row["epoch"])
    return found


def accuracy_on_test(state: dict[str, Any], trainer: JobTrainer, data_dir: Path) -> float:
    """Load saved weights into a model built from the file's spec, as a user would."""
    spec = JobSpec.model_validate(state["spec"])
    data = load_dataset(spec.dataset, data_dir)
    model = build_model(spec.model, data.input_shape, data.classes)
    assert trainer.morphable is not None
    morphable = esper.wrap(
        model,
        seeds_per_layer=state["seeds_per_layer"],
        layers=morphable_layers(model, spec.morphogenesis),
        kernels=trainer.morphable.kernels,
    )
    morphable.load_state_dict(state["model"])
    morphable.eval()
    with torch.no_grad():
        return float((morphable(data.test_x).argmax(1) == data.test_y).float().mean())


def job_events(runtime: JobRuntime) -> list[Message]:
    runtime.flush()

    async def read() -> list[Message]:
        entries: Any = await runtime.redis.xrange(runtime.store.events_key(JOB))
        return [Envelope.decode(fields[FIELD]).message() for _, fields in entries or []]

    return runtime.call(read())


def test_the_best_epoch_is_kept_with_its_seeds_and_measured_on_the_test_split(
    settings: TolariaSettings,
) -> None:
    with started(settings, JOB) as runtime:
        trainer = trainer_for(runtime, SCHEDULED)
        assert len(trainer.data.train_y) == 420, "STEPS assumes 420 training samples"
        params = [trainer.compute.parameters()]
        seen = epochs(trainer, 0, EPOCHS)
        trainer.measure_test()
        history = trainer.progress.history
        best = improving(history)
        # best.pt names the latest improving epoch after each epoch: written at those only.
        assert seen == [max(e for e in best if e <= epoch) for epoch in range(EPOCHS)]
        assert len(best) < EPOCHS, "no epoch failed to improve: the test shows nothing"
        assert best[-1] not in (0, EPOCHS - 1), "best and last (or no seeds) are one epoch"
        metrics = trainer.metrics
        assert metrics.best_epoch == best[-1]
        assert metrics.best_val_accuracy == history[best[-1]]["val_accuracy"]

        # The schedule germinated both seeds at the end of epoch 1, with no controller asked.
        events = job_events(runtime)
        taken = [(e.decision_id, e.outcome) for e in events if isinstance(e, DecisionTaken)]
        assert taken == [("sched-1-0", "applied"), ("sched-1-1", "applied")]
        assert trainer.orchestrator is not None
        records = trainer.orchestrator.records()
        grown = {key: (r.decision_id, r.germinated_step) for key, r in records.items()}
        at = 2 * STEPS  # the point that ends epoch 1
        assert grown == {("2", 0): ("sched-1-0", at), ("0", 1): ("sched-1-1", at)}
        assert not [e for e in events if isinstance(e, DecisionPointMissed)]
        assert metrics.parameters is not None and metrics.parameters > params[0]
        assert metrics.parameters == trainer.compute.parameters()
        assert metrics.train_flops is not None and metrics.train_flops > 0

        state = checkpoint.load(trainer.best.path)
        assert state is not None and state["epoch"] == best[-1]
        seeded = any(".seeds." in key for key in state["model"])
        assert seeded == (best[-1] >= 2), "the best epoch's seeds travel with its weights"
        assert metrics.best_test_accuracy == pytest.approx(
            accuracy_on_test(state, trainer, settings.data_dir), abs=1e-6
        )
        last = checkpoint.load(trainer.checkpoint_path)
        assert last is not None
        assert metrics.best_test_accuracy != metrics.test_accuracy
        assert metrics.test_accuracy == pytest.approx(
            accuracy_on_test(last, trainer, settings.data_dir), abs=1e-6
        )
        assert last["best"] == {"epoch": best[-1], "val_accuracy": metrics.best_val_accuracy}


def test_a_resumed_job_keeps_its_best_epoch(settings: TolariaSettings) -> None:
    registry = esper.LocalKernelRegistry()
    with started(settings, JOB) as first:
        trainer = trainer_for(first, SCHEDULED, registry=registry)
        epochs(trainer, 0, 3)
        kept = (trainer.best.epoch, trainer.best.val_accuracy)
        flops = trainer.metrics.train_flops
        # The process dies here: the next one resumes from the checkpoint of epoch 2.
    with started(settings, JOB) as second:
        resumed = trainer_for(second, SCHEDULED, create=False, registry=registry)
        assert resumed.resume()
        assert (resumed.best.epoch, resumed.best.val_accuracy) == kept
        assert resumed.metrics.train_flops == flops
        resumed.run()
        best = improving(resumed.progress.history)
        assert resumed.metrics.best_epoch == best[-1]
        state = checkpoint.load(resumed.best.path)
        assert state is not None and state["epoch"] == best[-1]
        assert resumed.metrics.best_test_accuracy == pytest.approx(
            accuracy_on_test(state, resumed, settings.data_dir), abs=1e-6
        )
        assert resumed.metrics.train_flops is not None and flops is not None
        assert resumed.metrics.train_flops > flops


def test_without_keep_best_no_weights_are_kept_but_the_best_epoch_is_reported(
    settings: TolariaSettings,
) -> None:
    with started(settings, JOB) as runtime:
        trainer = trainer_for(runtime, spec_with({"keep_best": False, "epochs": 3}))
        epochs(trainer, 0, 3)
        trainer.measure_test()
        assert not trainer.best.path.exists()
        best = improving(trainer.progress.history)
        metrics = trainer.metrics
        assert (metrics.best_epoch, metrics.best_val_accuracy) == (
            best[-1],
            trainer.progress.history[best[-1]]["val_accuracy"],
        )
        assert metrics.best_test_accuracy is None and metrics.test_accuracy is not None

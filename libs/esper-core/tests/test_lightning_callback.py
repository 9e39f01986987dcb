"""`EsperCallback` (esper.integrations.lightning): a real `lightning.Trainer` fitting a small
LightningModule (a Conv1d classifier over 1-D signals generated here, as in
test_session_local) grows it with the heuristic policy in this process, deterministically, and
decides on each epoch's own metrics."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import lightning
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from esper.exceptions import ConfigError
from esper.integrations.lightning import EsperCallback
from esper.kasmina import KasminaLayer
from esper.sessions import SEED_MAX_GRAD_NORM
from esper.testing.signals import LENGTH, SHORT_WINDOWS, conv1d_classifier, sinusoids

EPOCHS = 12
BATCH = 32
TRAIN, VAL = 384, 192
POLICY = SHORT_WINDOWS
pytestmark = [
    # Lightning's own, under this torch: nothing the tests or the callback do.
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
]


signals = sinusoids


class SignalClassifier(lightning.LightningModule):
    """The user's module: it logs train_loss, val_loss and val_acc, and keeps what validation
    measured in each epoch (`validated`) to hold the callback's reports against."""

    def __init__(
        self,
        optimizers: int = 1,
        manual: bool = False,
        steps: int = 1,
        fail_at: int = -1,
        loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = conv1d_classifier()
        self.n_optimizers = optimizers
        self.steps = steps
        """Optimizer steps per batch, with manual optimization."""
        self.fail_at = fail_at
        self.loss_scale = loss_scale
        self.automatic_optimization = not manual
        self.validated: dict[int, tuple[float, float]] = {}
        self.train_losses: dict[int, list[float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.fail_at:
            raise RuntimeError("the user's training_step failed")
        loss = F.cross_entropy(self(x), y) * self.loss_scale
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            for step in range(self.steps):
                if step:
                    loss = F.cross_entropy(self(x), y)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.train_losses.setdefault(self.current_epoch, []).append(loss.item())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log("val_loss", loss)
        self.log("val_acc", accuracy)
        if not self.trainer.sanity_checking:
            self.validated[self.current_epoch] = (float(loss), float(accuracy))

    def configure_optimizers(self) -> Any:
        optimizers = [torch.optim.Adam(self.parameters(), lr=0.01)]
        optimizers += [torch.optim.SGD(self.parameters(), lr=0.01)] * (self.n_optimizers - 1)
        return optimizers if len(optimizers) > 1 else optimizers[0]


class SeedGradients(lightning.Callback):
    """Listed after the EsperCallback: each seed group's gradient norm as the optimizer is about
    to update."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if str(group.get("name", "")).startswith("seed:") and grads:
                self.norms.append(float(torch.stack([g.norm() for g in grads]).norm()))


@contextlib.contextmanager
def restoring_globals() -> Iterator[None]:
    """`deterministic=True` and `seed_everything` set process-wide state: the tests run after
    these must not inherit it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Script:
    """The user's script: their LightningModule, their Trainer, one callback. What it built
    stays on it, for a test to look at even when `fit` raised."""

    def __init__(
        self,
        seed: int,
        *,
        epochs: int = EPOCHS,
        name: str = "lightning-signals",
        module_options: dict[str, Any] | None = None,
        trainer_options: dict[str, Any] | None = None,
        **callback_options: Any,
    ) -> None:
        self.seed = seed
        self.epochs = epochs
        self.name = name
        self.module_options = module_options or {}
        self.trainer_options = trainer_options or {}
        self.callback_options = callback_options
        self.modes: list[bool] = []
        self.seed_gradients = SeedGradients()
        """The module's `training` flag at each call of `evaluate`."""

    def fit(self) -> Script:
        with restoring_globals():
            lightning.seed_everything(self.seed, verbose=False)
            data = torch.Generator().manual_seed(0)
            x, y = signals(TRAIN, data)
            self.val_x, self.val_y = signals(VAL, data)
            self.module = module = SignalClassifier(**self.module_options)
            self.callback = EsperCallback(
                name=self.name,
                evaluate=self.accuracy,
                controller="local",
                policy=POLICY,
                loss_on_sample=lambda: F.cross_entropy(module(x[:128]), y[:128]),
                **self.callback_options,
            )
            self.trainer = lightning.Trainer(
                max_epochs=self.epochs,
                accelerator="cpu",
                devices=1,
                deterministic=True,
                enable_checkpointing=False,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[self.callback, self.seed_gradients],
                **self.trainer_options,
            )
            self.trainer.fit(
                module,
                DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True),
                DataLoader(TensorDataset(self.val_x, self.val_y), batch_size=VAL),
            )
        return self

    def accuracy(self) -> float:
        self.modes.append(self.module.training)
        with torch.no_grad():
            logits = self.module(self.val_x)
        return float((logits.argmax(dim=1) == self.val_y).float().mean())

    @property
    def decisions(self) -> list[tuple[int, int, str, str, str, str | None, str]]:
        """(epoch, step, decision id, action, layer, blueprint, outcome) of every decision."""
        return [
            (
                d.epoch,
                d.step,
                d.decision.decision_id,
                d.decision.action,
                d.decision.layer,
                d.decision.blueprint,
                d.taken.outcome,
            )
            for d in self.callback.run.decisions
        ]


@pytest.fixture(scope="module")
def first() -> Script:
    return Script(seed=7).fit()


def test_a_trainer_fit_grows_the_lightning_module_it_fits(first: Script) -> None:
    run, module, trainer = first.callback.run, first.module, first.trainer
    germinated = [d for d in first.decisions if d[3] == "germinate" and d[6] == "applied"]
    assert germinated, first.decisions
    # Decided at an epoch's end, after its last optimizer step.
    epoch, step = germinated[0][:2]
    assert step == (epoch + 1) * math.ceil(TRAIN / BATCH)
    grown = {
        (s.layer, s.seed)
        for r in run.reports
        for s in r.seeds
        if s.state in ("ACTIVE", "RETIRING", "RECYCLING")
    }
    assert grown, [(r.epoch, r.seeds) for r in run.reports]
    # One run.step per optimizer step, one decision point per epoch.
    assert run.global_step == trainer.global_step == EPOCHS * math.ceil(TRAIN / BATCH)
    assert [r.epoch for r in run.reports if r.decision_point] == list(range(EPOCHS))

    # The LightningModule object is the grown model, and its forward runs the seeds.
    assert run.morphable.model is module
    assert isinstance(module.net[0], KasminaLayer) and isinstance(module.net[8], KasminaLayer)
    running = [s for s in run.seeds() if s.state in ("ACTIVE", "RETIRING")]
    assert running, run.seeds()
    module.eval()
    x = torch.randn(5, 2, LENGTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_seeds = module(x)
        for seed in running:
            with run.morphable.seed_alpha_forced(seed.layer, seed.seed, 0.0):
                assert not torch.equal(module(x), with_seeds), seed

    # Sampled steps measured the layers with their gradients.
    steps = [r for r in run.reports if r.kind == "step"]
    assert steps and any(s.grad_norm is not None for r in steps for s in r.layers)
    # evaluate ran with the module in eval mode, and Lightning's own mode came back after it.
    assert first.modes and not any(first.modes)
    with pytest.raises(ConfigError, match="closed"):
        run.step()  # closed at fit's end


def test_each_decision_point_reports_the_metrics_of_its_own_epoch(first: Script) -> None:
    """Lightning validates after an epoch's last batch and before on_train_epoch_end: the
    decision point reads that validation, and the epoch's mean train loss."""
    run, module = first.callback.run, first.module
    epochs = [r for r in run.reports if r.kind == "epoch"]
    assert len(epochs) == EPOCHS == len(module.validated)
    for report in epochs:
        val_loss, val_accuracy = module.validated[report.epoch]
        assert report.val_accuracy == val_accuracy
        assert report.val_loss == val_loss
        losses = module.train_losses[report.epoch]
        assert report.train_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_seed_gradients_are_clipped_between_backward_and_the_update() -> None:
    # Adam's steps barely change with the loss's scale; the gradients grow with it, beyond the
    # seeds' max norm.
    script = Script(seed=7, module_options={"loss_scale": 100.0}).fit()
    assert any(d[3] == "germinate" and d[6] == "applied" for d in script.decisions)
    norms = script.seed_gradients.norms
    assert norms and max(norms) <= SEED_MAX_GRAD_NORM * (1 + 1e-5)
    # The host's own gradients are left as they are.
    host = [s.grad_norm for r in script.callback.run.reports for s in r.layers if s.grad_norm]
    assert max(host) > 10 * SEED_MAX_GRAD_NORM


def test_the_same_seed_makes_the_same_decisions(first: Script) -> None:
    second = Script(seed=7).fit()
    assert second.decisions == first.decisions
    assert second.accuracy() == first.accuracy()
    assert list(second.callback.run.reports) == list(first.callback.run.reports)


def test_validation_metrics_are_none_in_an_epoch_without_validation() -> None:
    script = Script(seed=1, epochs=3, trainer_options={"check_val_every_n_epoch": 2}).fit()
    epochs = [r for r in script.callback.run.reports if r.kind == "epoch"]
    assert [(r.epoch, r.val_loss, r.val_accuracy) for r in epochs[::2]] == [
        (0, None, None),
        (2, None, None),  # not epoch 1's, which callback_metrics still holds
    ]
    assert (epochs[1].val_loss, epochs[1].val_accuracy) == script.module.validated[1]
    assert all(r.train_loss is not None for r in epochs)


def test_a_validation_accuracy_under_another_name_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(seed=1, epochs=2, val_accuracy_metric="val_accuracy")
    with caplog.at_level(logging.WARNING, logger="esper.integrations.lightning"):
        script.fit()
    assert all(r.val_accuracy is None for r in script.callback.run.reports)
    warned = [r.getMessage() for r in caplog.records if r.name == "esper.integrations.lightning"]
    assert len(warned) == 1  # once, not every epoch
    assert "logged no 'val_accuracy'" in warned[0] and "val_acc," in warned[0]


def test_accumulated_batches_make_one_step_with_the_batch_loss() -> None:
    script = Script(seed=1, epochs=2, trainer_options={"accumulate_grad_batches": 2}).fit()
    run = script.callback.run
    assert run.global_step == script.trainer.global_step == 2 * math.ceil(TRAIN / BATCH) // 2
    # Step 0 ends at the window's second batch: its loss, not Lightning's loss / 2.
    first_step = next(r for r in run.reports if r.kind == "step" and r.step == 0)
    assert first_step.train_loss == pytest.approx(script.module.train_losses[0][1], rel=1e-5)


def test_manual_optimization_with_one_optimizer_steps_the_run() -> None:
    script = Script(seed=1, epochs=2, module_options={"manual": True}).fit()
    run = script.callback.run
    assert run.global_step == script.trainer.global_step == 2 * math.ceil(TRAIN / BATCH)
    first_step = next(r for r in run.reports if r.kind == "step" and r.step == 0)
    assert first_step.train_loss == pytest.approx(script.module.train_losses[0][0], rel=1e-5)
    assert [r.epoch for r in run.reports if r.decision_point] == [0, 1]


def test_two_optimizer_steps_in_one_batch_are_refused() -> None:
    script = Script(seed=1, epochs=1, module_options={"manual": True, "steps": 2})
    with pytest.raises(ConfigError, match="stepped twice in training batch 0"):
        script.fit()
    with pytest.raises(ConfigError, match="closed"):
        script.callback.run.step()


def test_what_the_callback_cannot_run_with_is_refused_before_the_model_is_touched() -> None:
    script = Script(seed=1, epochs=1, module_options={"manual": True, "optimizers": 2})
    with pytest.raises(ConfigError, match="exactly one optimizer, configure_optimizers gave 2"):
        script.fit()
    assert not any(isinstance(m, KasminaLayer) for m in script.module.modules())
    with pytest.raises(ConfigError, match="no run yet"):
        _ = script.callback.run

    with pytest.raises(ConfigError, match="evaluate must be a callable"):
        EsperCallback(name="r", evaluate=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'clip_seed_gradients', 'polcy'.*policy"):
        EsperCallback(name="r", evaluate=lambda: 0.0, polcy=POLICY, clip_seed_gradients=True)
    with pytest.raises(ConfigError, match="not a valid run name"):
        Script(seed=1, epochs=1, name="no spaces").fit()


def test_a_callback_grows_one_fit(first: Script) -> None:
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[first.callback],
    )
    module = SignalClassifier()
    x, y = signals(BATCH, torch.Generator().manual_seed(2))
    with pytest.raises(ConfigError, match="already grew a fit"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert not any(isinstance(m, KasminaLayer) for m in module.modules())


def test_a_failing_training_step_closes_the_session() -> None:
    # Step 10 is sampled (telemetry_every_steps=10): its layers' hooks are in when it fails.
    script = Script(seed=1, epochs=2, module_options={"fail_at": 10})
    with pytest.raises(RuntimeError, match="the user's training_step failed"):
        script.fit()
    run = script.callback.run
    assert run.global_step == 10
    with pytest.raises(ConfigError, match="closed"):
        run.begin_step()
    layers = [m for m in script.module.modules() if isinstance(m, KasminaLayer)]
    assert layers and not any(layer._forward_hooks for layer in layers)


def test_without_lightning_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "esper.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'esper-core\[lightning\]'"):
        importlib.import_module("esper.integrations.lightning")

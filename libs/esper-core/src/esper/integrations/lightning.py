"""`EsperCallback`: Esper's growth in a PyTorch Lightning `Trainer.fit`.

    callback = EsperCallback(name="my-run", evaluate=val_accuracy, controller="local")
    trainer = lightning.Trainer(callbacks=[callback], ...)
    trainer.fit(module, datamodule)
    callback.run.decisions  # what grew, where; `module` is the grown model

The callback drives an `esper.session` (esper.sessions) from Lightning's hooks:

    on_fit_start              the session opens on the LightningModule (wrapped in place) and
                              the trainer's one optimizer; the optimizers exist by then
                              (`strategy.setup` runs before the hook in `Trainer._run`)
    on_train_batch_start      `run.begin_step()`, before the batch's forward
    on_before_optimizer_step  `run.clip_seed_gradients()`: Lightning calls it after the
                              closure's backward and before the update
    on_train_batch_end        `run.step(loss)` if the optimizer stepped in the batch, else
                              `run.cancel_step()` (a batch that accumulates gradients)
    on_train_epoch_end        `run.end_epoch(...)`, the decision point; the epoch's validation
                              (run by the epoch loop after its last batch, before this hook) has
                              logged its metrics into `trainer.callback_metrics` by then
    on_fit_end, on_exception  `run.close()`

One device, one optimizer: a distributed strategy wraps the model before the first hook, and
seeds grown into it afterwards would escape the wrapper.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
except ImportError as err:
    raise ImportError(
        "esper.integrations.lightning needs PyTorch Lightning (the `lightning` package): "
        "pip install 'esper-core[lightning]'"
    ) from err

from esper.exceptions import ConfigError
from esper.sessions import Run, session

log = logging.getLogger(__name__)

_OWN_OPTIONS = {"model", "optimizer", "name", "evaluate", "clip_seed_gradients"}
SESSION_OPTIONS = frozenset(inspect.signature(session).parameters) - _OWN_OPTIONS
"""What `**session_options` may hold: `esper.session`'s keywords the callback does not set."""


class EsperCallback(pl.Callback):
    """Grow the LightningModule being fit with Esper, deciding at the end of each epoch.

    `name`: the run's name (1-128 letters, digits and _ . : -). `evaluate()`: a validation
    metric, higher is better (accuracy, or a negated loss); the callback runs it with the
    module in eval mode (each submodule's own mode is restored after), under `torch.no_grad`,
    once with the seeds and once per seed with its α forced to 0 at every epoch's end: it should
    be deterministic, or its noise reads as a seed's contribution. `**session_options`:
    passed to `esper.session` (controller, policy, seeds_per_layer, max_seeds,
    decide_every_steps, telemetry_every_steps, loss_on_sample, registry).

    The epoch's train_loss, val_loss and val_accuracy reported at its decision point are read
    from `trainer.callback_metrics` under `train_loss_metric`, `val_loss_metric` and
    `val_accuracy_metric` (what the module logs with `self.log`); a metric not logged, or a
    validation metric in an epoch without validation, is reported as None. With manual
    optimization the optimizer may step at most once per training batch.
    """

    def __init__(
        self,
        *,
        name: str,
        evaluate: Callable[[], float],
        train_loss_metric: str = "train_loss",
        val_loss_metric: str = "val_loss",
        val_accuracy_metric: str = "val_acc",
        **session_options: Any,
    ) -> None:
        if not callable(evaluate):
            raise ConfigError(
                f"evaluate must be a callable returning a validation metric (higher is better), "
                f"got {evaluate!r}"
            )
        unknown = sorted(set(session_options) - SESSION_OPTIONS)
        if unknown:
            raise ConfigError(
                f"EsperCallback got {', '.join(map(repr, unknown))}: the session options are "
                f"{', '.join(sorted(SESSION_OPTIONS))} (the callback sets "
                f"{', '.join(sorted(_OWN_OPTIONS - {'name', 'evaluate'}))} itself)"
            )
        self.name = name
        self.evaluate = evaluate
        self.train_loss_metric = train_loss_metric
        self.val_loss_metric = val_loss_metric
        self.val_accuracy_metric = val_accuracy_metric
        self.session_options = session_options
        self._run: Run | None = None
        self._stepped = False
        self._validated_epoch: int | None = None
        self._warned_missing = False

    @property
    def run(self) -> Run:
        """The session's Run (decisions, seeds, reports), from the start of `trainer.fit`."""
        if self._run is None:
            raise ConfigError(f"EsperCallback {self.name!r}: no run yet, it opens in trainer.fit")
        return self._run

    # ------------------------------------------------------------- fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            raise ConfigError(
                f"EsperCallback {self.name!r} already grew a fit (run {self._run.job_id!r}): "
                "give each trainer.fit an EsperCallback of its own"
            )
        optimizer = _single_optimizer(trainer)
        self._run = session(
            pl_module,
            optimizer,
            name=self.name,
            evaluate=_in_eval_mode(pl_module, self.evaluate),
            # Lightning computes the gradients inside optimizer.step (a closure): a step pre-hook
            # would run before backward, so on_before_optimizer_step clips instead.
            clip_seed_gradients=False,
            **self.session_options,
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._run.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._run is not None:
            self._run.close()

    # ----------------------------------------------------------- steps
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stepped = False
        self.run.begin_step()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._stepped:
            raise ConfigError(
                f"EsperCallback {self.name!r}: the optimizer stepped twice in training batch "
                f"{trainer.fit_loop.epoch_loop.batch_idx}; Esper counts one optimizer step per "
                "batch (with manual optimization, step at most once in a training_step)"
            )
        self._stepped = True
        self.run.clip_seed_gradients()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        run = self.run
        if not self._stepped:
            # Accumulating gradients: the step is the optimizer's, at the window's last batch,
            # whose own begin_step samples it afresh.
            run.cancel_step()
            return
        self._stepped = False
        loss = _loss_of(outputs)
        if loss is not None and pl_module.automatic_optimization:
            # Lightning divides the loss by the accumulation window before returning it.
            loss = loss * trainer.accumulate_grad_batches
        run.step(loss)
        self._stop_if_asked(trainer)

    # ---------------------------------------------------------- epochs
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # callback_metrics keeps the last value of every metric: a validation metric of an
        # earlier epoch must not pass for this one's.
        validated = self._validated_epoch == trainer.current_epoch
        val_accuracy = _metric(trainer, self.val_accuracy_metric) if validated else None
        if validated and val_accuracy is None:
            self._warn_missing(trainer)
        self.run.end_epoch(
            train_loss=_metric(trainer, self.train_loss_metric),
            val_loss=_metric(trainer, self.val_loss_metric) if validated else None,
            val_accuracy=val_accuracy,
        )
        self._stop_if_asked(trainer)

    def _warn_missing(self, trainer: pl.Trainer) -> None:
        # The policy decides on the validation accuracy: a module logging it under another name
        # would train without ever growing, and nothing else would say why.
        if self._warned_missing:
            return
        self._warned_missing = True
        log.warning(
            "EsperCallback %r: the epoch validated but logged no %r (val_accuracy_metric); "
            "the logged metrics are %s",
            self.name,
            self.val_accuracy_metric,
            ", ".join(sorted(trainer.callback_metrics)) or "(none)",
        )

    def _stop_if_asked(self, trainer: pl.Trainer) -> None:
        if self.run.should_stop:
            trainer.should_stop = True


def _single_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise ConfigError(
            f"EsperCallback runs on one device (SingleDeviceStrategy), not with "
            f"{type(trainer.strategy).__name__}: seeds grow the model in place, after a "
            "distributed strategy has wrapped it"
        )
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        raise ConfigError(
            f"EsperCallback needs exactly one optimizer, configure_optimizers gave "
            f"{len(optimizers)}: the seeds join one optimizer in param groups of their own"
        )
    return optimizers[0]


def _in_eval_mode(module: nn.Module, evaluate: Callable[[], float]) -> Callable[[], float]:
    """`evaluate` run with `module` in eval mode; afterwards each submodule gets back its own
    mode, so a part the user keeps in eval mode (a frozen backbone) stays so."""

    def evaluate_in_eval_mode() -> float:
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            return evaluate()
        finally:
            for m, training in modes:
                m.training = training

    return evaluate_in_eval_mode


def _loss_of(outputs: Any) -> torch.Tensor | float | None:
    """The loss in what a training_step returned, as Lightning passes it to the batch's end."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    if isinstance(outputs, (int, float)) and not isinstance(outputs, bool):
        return float(outputs)
    return None


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None

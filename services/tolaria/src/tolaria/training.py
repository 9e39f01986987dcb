"""One job's training, in the job process: build the data and the model from the spec, wrap it,
train epoch by epoch, execute control decisions at decision points (decisionpoints.py), measure
seeds, checkpoint every epoch, resume from the last checkpoint.

The per-step path is kept to what a plain PyTorch loop does plus a flag check, a counter check
and the wrapper's own bookkeeping, so a job with dormant seeds runs at (nearly) plain speed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import esper
from esper.client import UrzaClient
from esper.contracts import (
    DecisionTaken,
    JobMetrics,
    JobProgress,
    JobSpec,
    RefusalCode,
    TelemetryReport,
)
from esper.contracts.jobs import SeedView, TrainingSpec
from esper.kernels import tiered_cache
from esper.morphable import MorphableModel
from esper.training import SeedOrchestrator, TelemetryReporter
from tolaria import checkpoint, usercode
from tolaria.best import BestEpoch, summary
from tolaria.compute import ComputeMeter
from tolaria.datasets import DataSplits, load_dataset
from tolaria.decisionpoints import DecisionPoints
from tolaria.lockstep import STOP_EVERY, Lockstep, shard
from tolaria.models import build_model, morphable_layers
from tolaria.publishing import publish_trained_kernels
from tolaria.runtime import JobRuntime
from tolaria.usercode import ZipLimits

log = logging.getLogger("tolaria.job")


SAMPLE_ROWS = 512  # training rows a widening seed's data-driven start is computed from


class StopRequested(Exception):
    pass


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("the spec asks for device cuda, but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def on_device(data: DataSplits, device: torch.device) -> DataSplits:
    """The whole data set on the training device: these sets are small, and indexing a tensor
    already there is what keeps the per-step path free of copies."""
    if device.type == "cpu":
        return data
    tensors = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return dataclasses.replace(data, **{n: getattr(data, n).to(device) for n in tensors})


def make_optimizer(params: list[nn.Parameter], spec: TrainingSpec) -> torch.optim.Optimizer:
    group = {"params": params, "name": "host"}
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            [group], lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.optimizer == "adamw":
        return torch.optim.AdamW([group], lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam([group], lr=spec.lr, weight_decay=spec.weight_decay)


def lr_factor(spec: TrainingSpec, epoch: int) -> float:
    """The schedule, applied to the host group only: seeds keep their own lr."""
    if spec.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))
    if spec.schedule == "step":
        return float(spec.gamma ** (epoch // spec.step_size))
    return 1.0


@dataclass
class Evaluation:
    loss: float
    accuracy: float


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class JobTrainer:
    """`lockstep`: this is one rank of a distributed job (tolaria.lockstep): it trains on its
    shard, averages gradients with the others, and only rank 0 asks, saves and reports."""

    def __init__(
        self,
        runtime: JobRuntime,
        spec: JobSpec,
        data_dir: Path,
        work_dir: Path,
        lockstep: Lockstep | None = None,
    ) -> None:
        self.runtime = runtime
        self.lockstep = lockstep
        self.leads = lockstep is None or lockstep.leads
        self.job_id = runtime.job_id
        self.spec = spec
        self.training = spec.training
        self.morph = spec.morphogenesis
        self.checkpoint_path = checkpoint.path_for(work_dir, self.job_id)
        self.device = pick_device(self.training.device)
        if spec.code is not None:  # the user's code is imported in this process, from here
            limits = ZipLimits.of(runtime.settings)
            usercode.activate(
                usercode.code_dir_for(spec.code, data_dir, work_dir, self.job_id, limits)
            )
        torch.manual_seed(self.training.seed)
        self.data: DataSplits = on_device(load_dataset(spec.dataset, data_dir), self.device)
        model = self._build_host()
        self.loss_fn = nn.CrossEntropyLoss()
        settings = runtime.settings
        key = settings.kernel_signing_key
        self.cache = tiered_cache(
            redis_url=runtime.bus.redis_url,
            urza_url=settings.urza_url,
            urza_token=settings.urza_token_value,
            urza_timeout_s=settings.urza_timeout_s,
            signing_key=key.get_secret_value().encode() if key else None,
            trust_torchscript=settings.trust_torchscript,
        )
        runtime.heartbeat_details = self.cache_counters
        self.morphable: MorphableModel | None = None
        self.orchestrator: SeedOrchestrator | None = None
        self.reporter: TelemetryReporter | None = None
        self.points: DecisionPoints | None = None
        self.urza: UrzaClient | None = None
        if self.morph.enabled:
            self.morphable = self._wrap(model)
            self.model: nn.Module = self.morphable
            self.urza = self._urza_client()
        else:
            self.model = model
        host_params = (
            self.morphable.host_parameters() if self.morphable else list(model.parameters())
        )
        self.optimizer = make_optimizer(host_params, self.training)
        self.host_group = self.optimizer.param_groups[0]
        if self.morphable is not None:
            self.morphable.attach_optimizer(
                self.optimizer, lr=self.morph.seed_lr or self.training.lr, max_grad_norm=1.0
            )
            self.orchestrator = SeedOrchestrator(
                self.morphable,
                self.job_id,
                self.urza if self.urza is not None else _NoKernelProvider(),
                self.morph,
                runtime.emit,
                kernel_format=self.morph.kernel_format,
                loss_on_sample=self.loss_on_sample,
            )
            self.orchestrator.attach()
            self.points = DecisionPoints(runtime, self.orchestrator, self.morph, lockstep)
            self.reporter = TelemetryReporter(
                self.morphable,
                self.job_id,
                runtime.telemetry,
                every_steps=self.training.telemetry_every_steps,
            )
        self.progress = Progress()
        self.metrics = JobMetrics()
        self.best = BestEpoch(
            checkpoint.best_path_for(work_dir, self.job_id),
            keep=self.training.keep_best and self.leads,
            header=self._header,
        )
        self.compute = ComputeMeter(self.model, self.morphable, self.data.train_x[:1])
        self._epoch_first_step = 0
        self._charged = 0  # training samples of this epoch already charged to `compute`

    def _build_host(self) -> nn.Module:
        spec = self.spec
        return build_model(spec.model, self.data.input_shape, self.data.classes).to(self.device)

    def _wrap(self, model: nn.Module) -> MorphableModel:
        # The bypass is safe here: the job builds the model and hooks only the Kasmina layers.
        return esper.wrap(
            model,
            seeds_per_layer=self.morph.seeds_per_layer,
            layers=morphable_layers(model, self.morph),
            # The job's model's own cache once there is one: its kernels are the ones to load.
            kernels=self.morphable.kernels if self.morphable is not None else self.cache,
            dormant_bypass=True,
        )

    def fresh_model(self) -> nn.Module:
        """A model of the job's build (wrapped like the job's) to load saved weights into;
        built without touching the job's RNG stream."""
        with torch.random.fork_rng(devices=[]):
            model = self._build_host()
            return self._wrap(model) if self.morph.enabled else model

    def cache_counters(self) -> dict[str, Any]:
        return {
            f"cache.{tier}.{kind}": count
            for tier, counts in self.cache.stats().items()
            for kind, count in counts.items()
            if kind in ("hits", "misses")
        }

    def _urza_client(self) -> UrzaClient | None:
        settings = self.runtime.settings
        if not settings.urza_url:
            return None

        # Created on the bus loop: the client's connections belong to the loop that uses them.
        async def make() -> UrzaClient | None:
            return settings.urza_client()

        return self.runtime.call(make())

    # ------------------------------------------------------------- resume
    def resume(self) -> bool:
        state = checkpoint.load(self.checkpoint_path)
        self.runtime.requeue_held_decisions()
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        checkpoint.restore_group_states(self.optimizer, state["optimizer"])
        if self.orchestrator is not None and state.get("orchestrator") is not None:
            self.orchestrator.load_state_dict(state["orchestrator"])
        if self.points is not None:
            self.points.load_state_dict(state.get("points"))
        self.progress = Progress(state["epoch"], state["step"], list(state["history"]))
        self.best.load_state_dict(state.get("best"), self.progress.history)
        metrics = JobMetrics.model_validate(state["metrics"])
        self.compute.total = metrics.train_flops or 0.0
        # The checkpoint after a decision point may predate it (it is saved again only when
        # the point changed something): the parameters are counted from the restored model.
        self.metrics = metrics.model_copy(update={"parameters": self.compute.parameters()})
        torch.set_rng_state(state["rng"])
        log.info("resumed from the checkpoint of epoch %d (step %d)", state["epoch"], state["step"])
        return True

    def _header(self) -> dict[str, Any]:
        """What a saved file needs to be loaded into a model of the job's build."""
        return {
            "job_id": self.job_id,
            "spec": self.spec.model_dump(mode="json"),
            "layers": self.morphable.layer_names() if self.morphable else [],
            "seeds_per_layer": self.morph.seeds_per_layer,
        }

    def save(self) -> None:
        if not self.leads:  # one checkpoint for every rank, written once
            return
        checkpoint.save(
            self.checkpoint_path,
            {
                **self._header(),
                "epoch": self.progress.epoch,
                "step": self.progress.step,
                "history": self.progress.history,
                "metrics": self.metrics.model_dump(mode="json"),
                "model": self.model.state_dict(),
                "optimizer": checkpoint.group_states(self.optimizer),
                "orchestrator": self.orchestrator.state_dict() if self.orchestrator else None,
                "points": self.points.state_dict() if self.points else None,
                "rng": torch.get_rng_state(),
                "best": self.best.state_dict(),
            },
        )

    # --------------------------------------------------------------- train
    def run(self) -> None:
        """Train the remaining epochs; StopRequested when a stop (or orphaning) interrupts."""
        spec = self.training
        if self.points is not None and self.points.open is not None:
            # Resumed from a checkpoint whose decision point was asked but not settled: ask it
            # again (the controller answers a point it answered with the same answer).
            self.runtime.ask_again(self.points.open)
            self._settle(self.progress.epoch - 1)
        while self.progress.epoch < spec.epochs:
            epoch = self.progress.epoch
            self.host_group["lr"] = spec.lr * lr_factor(spec, epoch)
            train_loss, samples_per_s = self.train_epoch(epoch)
            self.end_epoch(epoch, train_loss, samples_per_s)
        self.refuse_waiting_decisions("job_finished", "the job has finished training")
        self.measure_test()
        if self.morph.publish_kernels and self.leads:
            publish_trained_kernels(self)

    def train_epoch(self, epoch: int) -> tuple[float | None, float]:
        """One epoch. The step loop does what a plain PyTorch loop does plus tests of local flags:
        anything else (a stop, a decision, a sampled step, a seed to advance) is behind one. On a
        tiny model each call in the loop costs ~1 % of the step, far more than the same call run
        in a tight loop, so calls are made only when their flag says there is work."""
        data, spec, progress = self.data, self.training, self.progress
        # Steps call the wrapped model's inner module: MorphableModel.forward only delegates to
        # it, and one module call less per step is ~1% of a tiny model's step.
        model = self.morphable.model if self.morphable is not None else self.model
        optimizer, loss_fn, lockstep = self.optimizer, self.loss_fn, self.lockstep
        # The ranks stop together (an agreement every STOP_EVERY steps), not at rank 0's wakeup.
        wakeups: list[str] = self.runtime.wakeups if lockstep is None else []
        morphable, reporter, orchestrator = self.morphable, self.reporter, self.orchestrator
        every = (reporter.every_steps if reporter is not None else None) or 0
        decide_every = (self.points.every_steps if self.points is not None else None) or 0
        seeded = morphable is not None and not morphable.all_dormant
        # On the CPU reading a loss costs nothing; on an accelerator it would sync every step,
        # so there the losses stay on the device until the epoch ends.
        on_cpu = self.device.type == "cpu"
        total, losses, steps = 0.0, [], 0
        self._epoch_first_step, self._charged = progress.step, 0
        generator = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)
        order = torch.randperm(len(data.train_y), generator=generator).to(self.device)
        if lockstep is not None:
            order = shard(order, lockstep.rank, lockstep.world)
        model.train()
        start = time.perf_counter()
        for begin in range(0, len(order), spec.batch_size):
            if wakeups:
                paused = time.perf_counter()
                seeded = self.attend(epoch)
                start += time.perf_counter() - paused  # a compile is not training time
            index = order[begin : begin + spec.batch_size]
            step = progress.step
            sampled = every and step % every == 0
            if sampled:
                reporter.begin_step(step)  # type: ignore[union-attr]
            if seeded:
                # Transitions inside the step (a ramp ending, the circuit breaker) carry it.
                orchestrator.on_step(step)  # type: ignore[union-attr]
            loss = loss_fn(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if lockstep is not None:
                lockstep.average_gradients(model)
                if step % STOP_EVERY == 0 and lockstep.any(self.runtime.stop_event.is_set()):
                    raise StopRequested
            if seeded:
                morphable.clip_seed_gradients()  # type: ignore[union-attr]
            optimizer.step()
            if seeded:
                morphable.step()  # type: ignore[union-attr]
                seeded = not morphable.all_dormant  # type: ignore[union-attr]
            if sampled:
                reporter.end_step(step, epoch, loss)  # type: ignore[union-attr]
            if on_cpu:
                total += loss.item()
            else:
                losses.append(loss.detach())
            steps += 1
            progress.step = step + 1
            # A point at the epoch's last step is the epoch's own (end_epoch asks it).
            if (
                decide_every
                and progress.step % decide_every == 0
                and begin + len(index) < len(order)
            ):
                paused = time.perf_counter()
                seeded = self.step_point(epoch)
                start += time.perf_counter() - paused  # waiting for an answer is not training
        elapsed = time.perf_counter() - start
        if losses:
            total = float(torch.stack(losses).sum())  # one sync an epoch
        mean = total / steps if steps else math.nan
        rate = len(order) / max(elapsed, 1e-9)
        if lockstep is not None:  # the job's: the mean of the ranks' losses, their summed rate
            mean, rate = lockstep.mean(mean), lockstep.total(rate)
        return (mean if math.isfinite(mean) else None), rate

    def attend(self, epoch: int) -> bool:
        """A wakeup: stop if asked. Returns whether any seed is out of DORMANT (the step loop
        then advances the seeds)."""
        self.runtime.wakeups.clear()  # before looking: a later wakeup is seen next step
        stop = self.runtime.stop_event.is_set()
        if self.lockstep is not None:  # every rank stops here, or none does
            stop = self.lockstep.any(stop)
        if stop:
            raise StopRequested
        return self.morphable is not None and not self.morphable.all_dormant

    def step_point(self, epoch: int) -> bool:
        """A decision point within the epoch (`decide_every_steps`); not checkpointed: a job
        resumed from the epoch's start reaches it again and gets the same answer."""
        assert self.points is not None and self.reporter is not None
        # The samples trained so far this epoch, with the model as it was before this point.
        trained = (self.progress.step - self._epoch_first_step) * self.training.batch_size
        self.charge_epoch(min(trained, len(self.data.train_y)))
        report = self.reporter.point_report(
            epoch,
            self.progress.step,
            answers=self.points.take_answers(),
            decision_point=self.points.asks_controller,
        )
        self.points.ask(report)
        self.points.settle(step=self.progress.step, epoch=epoch)
        return self.attend(epoch)

    def charge_epoch(self, trained: int) -> None:
        """Charge the training compute of this epoch's samples up to `trained`."""
        self.compute.charge(trained - self._charged)
        self._charged = trained

    def _settle(self, epoch: int) -> None:
        """Settle the epoch's open point; checkpoint again if it changed the model."""
        assert self.points is not None
        if self.points.settle(step=self.progress.step, epoch=epoch):
            self.save()
        self.points.release()

    def measure_test(self) -> None:
        """The test split, with the last weights and with the best epoch's (kept in best.pt)."""
        data, best = self.data, self.best
        update: dict[str, Any] = {}
        if len(data.test_y):
            test = self.evaluate(data.test_x, data.test_y)
            update = {"test_loss": _finite(test.loss), "test_accuracy": test.accuracy}
            if best.keep and best.epoch is not None and best.path.exists():
                model = self.fresh_model()
                best.load_weights(model)
                update["best_test_accuracy"] = self.evaluate(
                    data.test_x, data.test_y, model
                ).accuracy
        self.metrics = self.metrics.model_copy(update=update)
        log.info(summary(self.metrics, self.progress.epoch, self.training.epochs))

    def loss_on_sample(self) -> torch.Tensor:
        """The loss on the first SAMPLE_ROWS training rows, in eval mode (no batch-norm statistics
        move): the fixed sample a widening seed's fan-in is computed from."""
        was_training = self.model.training
        self.model.eval()
        try:
            rows = slice(0, SAMPLE_ROWS)
            return self.loss_fn(self.model(self.data.train_x[rows]), self.data.train_y[rows])
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None
    ) -> Evaluation:
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        batch = max(self.training.batch_size, 1024)
        for begin in range(0, len(y), batch):
            out = model(x[begin : begin + batch])
            target = y[begin : begin + batch]
            total_loss += float(self.loss_fn(out, target)) * len(target)
            correct += int((out.argmax(dim=1) == target).sum())
        model.train(was_training)
        n = max(1, len(y))
        return Evaluation(total_loss / n, correct / n)

    def end_epoch(self, epoch: int, train_loss: float | None, samples_per_s: float) -> None:
        data = self.data
        val = self.evaluate(data.val_x, data.val_y)
        contributions: dict[tuple[str, int], float] = {}
        if self.orchestrator is not None:
            contributions = self.orchestrator.measure(
                lambda: self.evaluate(data.val_x, data.val_y).accuracy
            )
        self.progress.epoch = epoch + 1
        self.charge_epoch(len(data.train_y))
        # Before the point: these are the weights (and seeds) that were measured.
        self.best.consider(epoch, val.accuracy, self.model)
        self.metrics = JobMetrics(
            train_loss=train_loss,
            val_loss=_finite(val.loss),
            val_accuracy=val.accuracy,
            samples_per_s=samples_per_s,
            best_epoch=self.best.epoch,
            best_val_accuracy=self.best.val_accuracy,
            parameters=self.compute.parameters(),
            train_flops=self.compute.total,
        )
        self.progress.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": _finite(val.loss),
                "val_accuracy": val.accuracy,
            }
        )
        last = self.progress.epoch == self.training.epochs  # nothing left to grow for
        if self.reporter is not None:
            if not self.reporter.has_layer_stats:
                self.reporter.sample_layers(data.val_x[: self.training.batch_size])
            asking = self.points is not None and not last
            report = self.reporter.epoch_report(
                epoch=epoch,
                step=self.progress.step,
                train_loss=train_loss,
                val_loss=_finite(val.loss),
                val_accuracy=val.accuracy,
                samples_per_s=samples_per_s,
                contributions=contributions,
                decision_point=asking and self.points is not None and self.points.asks_controller,
                answers=self.points.take_answers() if self.points is not None else (),
            )
            if asking:
                assert self.points is not None
                self.points.ask(report)
        else:
            self.runtime.telemetry(
                _plain_report(
                    self.job_id, epoch, self.progress.step, train_loss, val, samples_per_s
                )
            )
        # Saved with the epoch, the open point with it: a crash from here on retrains nothing,
        # and a job resumed from this checkpoint asks the point again.
        self.save()
        if self.points is not None:
            self._settle(epoch)
        else:
            self.refuse_waiting_decisions("morphogenesis_off", "morphogenesis is off for this job")
        # What the point grew counts from now on.
        self.metrics = self.metrics.model_copy(update={"parameters": self.compute.parameters()})
        # Queued, not awaited: a Redis restart now must not stop training; the journal writes
        # it once Redis is back, after this epoch's report.
        self.record_progress()
        log.info(
            "epoch %d/%d: train loss %s, val loss %.4f, val acc %.4f, %.0f samples/s",
            epoch + 1,
            self.training.epochs,
            _fmt(train_loss),
            val.loss,
            val.accuracy,
            samples_per_s,
        )

    def record_progress(self) -> None:
        """The job's record says what the checkpoint says (epoch, step, metrics, seeds)."""
        self.runtime.record(
            progress=self.view_progress(),
            metrics=self.metrics,
            seeds=self.seed_views(),
            has_checkpoint=True,
        )

    def view_progress(self) -> JobProgress:
        epochs = self.training.epochs
        return JobProgress(
            epoch=self.progress.epoch,
            epochs=epochs,
            step=self.progress.step,
            fraction=min(1.0, self.progress.epoch / epochs),
        )

    def seed_views(self) -> list[SeedView]:
        return self.orchestrator.seed_views() if self.orchestrator is not None else []

    # ----------------------------------------------------------- decisions
    def refuse_waiting_decisions(self, code: RefusalCode, reason: str) -> None:
        refused = []
        while not self.runtime.decisions.empty():
            decision = self.runtime.decisions.get()
            self.runtime.emit(DecisionTaken.refused(decision, code, reason, seed=decision.seed))
            refused.append(decision)
        self.runtime.release_decisions(refused)


class _NoKernelProvider:
    async def kernel_for(self, blueprint: str, host: Any, fmt: Any) -> str:
        raise RuntimeError("no Urza is configured (TOLARIA_URZA_URL): cannot compile blueprints")


def _plain_report(
    job_id: str,
    epoch: int,
    step: int,
    train_loss: float | None,
    val: Evaluation,
    samples_per_s: float,
) -> TelemetryReport:
    """The epoch report of a job without morphogenesis (no wrapped layers, no seeds)."""
    return TelemetryReport(
        job_id=job_id,
        epoch=epoch,
        step=step,
        kind="epoch",
        train_loss=train_loss,
        val_loss=_finite(val.loss),
        val_accuracy=val.accuracy,
        samples_per_s=samples_per_s,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

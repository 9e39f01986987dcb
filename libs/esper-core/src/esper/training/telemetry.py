"""TelemetryReporter: per-layer and per-seed statistics of a training job, as TelemetryReports.

Statistics are collected by forward hooks on the wrapped layers, but only on sampled steps: on
every other step `begin_step` and `end_step` return at once, with no hook installed, no tensor op
and no host-device sync, so a job that reports every K steps trains at the speed of one that does
not report at all. On a sampled step the hooks keep their statistics as device tensors, and
`end_step` reads everything (activations, gradient norms, the loss) in one transfer per device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from esper.contracts.events import DecisionTaken
from esper.contracts.telemetry import LayerStats, Metric, SeedStats, TelemetryReport, finite_or_none
from esper.contracts.vocabulary import SeedStateName
from esper.exceptions import ConfigError
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.state import SeedState
from esper.morphable import MorphableModel

log = logging.getLogger(__name__)

SeedKey = tuple[str, int]


@dataclass
class _Moments:
    """Running statistics of one layer's outputs within a sampled step, kept on the device.

    A layer may run more than once in a step (a shared layer, gradient accumulation): batches are
    merged with Chan's parallel formula, so the mean and variance are those of all outputs seen.
    One output costs three small ops (var_mean, amax, a compare); tiny models feel each op.
    """

    count: int = 0
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None  # population variance
    alive: torch.Tensor | None = None  # per output feature: positive at least once

    def add(self, y: torch.Tensor, kind: str) -> None:
        y = y.detach()
        n = y.numel()
        if n == 0:
            return
        if not y.is_floating_point() or y.dtype in (torch.float16, torch.bfloat16):
            y = y.float()  # half-precision sums of a large batch lose the variance
        variance, mean = torch.var_mean(y, correction=0)
        # Output features: the last dim of a Linear, the channels of a Conv2d or Conv1d (dim 1
        # when batched, dim 0 for an unbatched [C, H, W] or [C, L] input).
        if kind in ("conv2d", "conv1d"):
            channel_dim = 1 if y.dim() == (4 if kind == "conv2d" else 3) else 0
            peak = y.transpose(0, channel_dim).reshape(y.shape[channel_dim], -1).amax(dim=1)
        else:
            peak = y.reshape(-1, y.shape[-1]).amax(dim=0)
        alive = peak > 0
        if self.mean is None or self.variance is None or self.alive is None:
            self.count, self.mean, self.variance, self.alive = n, mean, variance, alive
            return
        total = self.count + n
        delta = mean - self.mean
        m2 = self.variance * self.count + variance * n + delta * delta * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.variance = m2 / total
        self.alive = self.alive | alive
        self.count = total


class TelemetryReporter:
    """Builds and publishes a job's TelemetryReports.

    Per wrapped layer (a KasminaLayer, so its output includes the seeds' blend):

    - `activation_mean`, `activation_variance`: of every element of the layer's output (the
      population variance), over all forwards of the sampled step;
    - `dead_fraction`: the fraction of output features (a Linear's output units, a Conv2d's
      channels) that were never positive in the window, i.e. whose value was ≤ 0 for every sample
      of the batch (and, for a conv channel, at every position). The layer's output is taken
      before any activation function, so "dead" means "a following ReLU would output 0 for the
      whole batch";
    - `grad_norm`: the L2 norm of the gradients of the host layer's parameters (weight and bias)
      after backward; None when the host has no gradient (frozen, or not measured).

    Call `begin_step(step)` before the forward and `end_step(step, epoch, loss)` after backward
    (before `optimizer.zero_grad`). Unmeasured values are None, never 0; NaN or infinite metrics
    are None and named in the report's `nonfinite`; non-finite layer statistics are None.
    """

    def __init__(
        self,
        morphable: MorphableModel,
        job_id: str,
        publish: Callable[[TelemetryReport], None],
        *,
        every_steps: int | None,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ConfigError(f"every_steps must be ≥ 1 or None, got {every_steps!r}")
        self.morphable = morphable
        self.job_id = job_id
        self.publish = publish
        self.every_steps = every_steps
        self._layers: dict[str, KasminaLayer] = morphable.layers
        self._handles: list[RemovableHandle] = []
        self._moments: dict[str, _Moments] = {}
        self._gains: dict[str, _GainSample] = {}
        self._latest: list[LayerStats] = []
        self.publish_errors = 0

    # ---------------------------------------------------------- sampling
    def is_sampled(self, step: int) -> bool:
        return self.every_steps is not None and step % self.every_steps == 0

    @property
    def collecting(self) -> bool:
        """True between a sampled step's begin_step and its end_step."""
        return bool(self._handles)

    @property
    def has_layer_stats(self) -> bool:
        """Whether layer statistics were collected since the last epoch report; when not, the
        runner calls `sample_layers(batch)` before `epoch_report`."""
        return bool(self._latest)

    def begin_step(self, step: int) -> None:
        """Install the hooks if `step` is sampled; otherwise return at once."""
        if self.every_steps is None or step % self.every_steps:
            return
        self._install()

    def end_step(
        self, step: int, epoch: int, loss: torch.Tensor | float | None
    ) -> TelemetryReport | None:
        """On a sampled step (hooks installed): remove the hooks, read the statistics and the
        gradients, publish a `kind="step"` report and return it. Otherwise return None at once."""
        if not self._handles:
            return None
        self._remove()
        loss_tensor = loss.detach() if isinstance(loss, torch.Tensor) else None
        layers, read_loss = self._collect(with_grads=True, extra=loss_tensor)
        self._latest = layers
        train_loss = read_loss if loss_tensor is not None else _scalar(loss)
        report = TelemetryReport.from_measurements(
            job_id=self.job_id,
            epoch=epoch,
            step=step,
            kind="step",
            metrics={"train_loss": train_loss},
            layers=layers,
            seeds=self.seed_stats(),
        )
        self._publish(report)
        return report

    def cancel_step(self) -> None:
        """Remove the hooks without reporting (the step failed between begin_step and end_step)."""
        self._remove()

    def sample_layers(self, batch_x: Any) -> list[LayerStats]:
        """Layer statistics from one forward of `batch_x` without gradients (no grad norms), for
        an epoch whose steps were not sampled. The model runs in eval mode for it, so that the
        sampling pass does not update BatchNorm statistics or draw dropout masks, and each
        module's mode is restored afterwards."""
        if self._handles:
            raise ConfigError("sample_layers during a sampled step: call end_step first")
        modes = {m: m.training for m in self.morphable.modules()}
        self._install()
        try:
            self.morphable.eval()
            with torch.no_grad():
                self.morphable(batch_x)
        finally:
            self._remove()
            for module, training in modes.items():
                module.training = training
        self._latest, _ = self._collect(with_grads=False)
        return list(self._latest)

    def _install(self) -> None:
        self._remove()  # a sampled step whose end_step never came: start afresh
        self._moments = {name: _Moments() for name in self._layers}
        # Linear layers with a next layer: their growth_gain needs their inputs and the next
        # layer's output gradients (conv pairs have no such matrix: see LayerStats.growth_gain).
        self._gains = {
            name: _GainSample()
            for name, layer in self._layers.items()
            if layer.downstream is not None and layer.signature.kind == "linear"
        }
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name, layer)))
            downstream = layer.downstream
            if name in self._gains and downstream is not None:
                sample = self._gains[name]
                self._handles.append(downstream.register_forward_hook(sample.take_gradient))

    def _hook(
        self, name: str, layer: KasminaLayer
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        moments = self._moments[name]
        kind = layer.signature.kind
        gain = self._gains.get(name)

        def record(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor):
                moments.add(output, kind)
            if gain is not None and args and isinstance(args[0], torch.Tensor):
                gain.take_input(args[0])

        return record

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _collect(
        self, *, with_grads: bool, extra: torch.Tensor | None = None
    ) -> tuple[list[LayerStats], float | None]:
        """The layers' statistics, and `extra` (the loss), read in one transfer per device."""
        names = list(self._layers)
        tensors: list[torch.Tensor | None] = [extra]
        features: list[int] = []
        for name in names:
            m = self._moments.get(name, _Moments())
            alive = None if m.alive is None else m.alive.sum()
            features.append(0 if m.alive is None else m.alive.numel())
            tensors.extend((m.mean, m.variance, alive))
        grads = [_host_grads(self._layers[n].base_layer) if with_grads else [] for n in names]
        gains = {n: s.gain() if with_grads else None for n, s in self._gains.items()}
        values = _read([*tensors, *_norms([g for gs in grads for g in gs]), *gains.values()])
        read_gains = dict(zip(gains, values[len(values) - len(gains) :], strict=True))
        self._moments, self._gains = {}, {}
        grad_values = iter(values[1 + 3 * len(names) :])
        stats = []
        for i, name in enumerate(names):
            mean_v, variance_v, alive_v = values[1 + 3 * i : 4 + 3 * i]
            dead_v = None if alive_v is None else 1.0 - alive_v / max(features[i], 1)
            norms = [next(grad_values) for _ in grads[i]]
            grad_v = math.sqrt(sum(v * v for v in norms if v is not None)) if norms else None
            if mean_v is not None and not math.isfinite(mean_v):
                # A NaN output compares as "not positive" everywhere, which would read as a fully
                # dead layer; the layer diverged, and its statistics are unknown.
                variance_v = dead_v = None
            stats.append(
                LayerStats(
                    layer=name,
                    activation_mean=finite_or_none(mean_v),
                    activation_variance=_clamp(finite_or_none(variance_v), 0.0, None),
                    dead_fraction=_clamp(finite_or_none(dead_v), 0.0, 1.0),
                    grad_norm=finite_or_none(grad_v),
                    # Set by esper.wrap where the next layer is fed through an activation only.
                    next_layer=getattr(self._layers[name], "next_layer", None),
                    kind=self._layers[name].signature.kind,
                    growth_gain=_clamp(finite_or_none(read_gains.get(name)), 0.0, None),
                )
            )
        return stats, values[0]

    # -------------------------------------------------------------- seeds
    def seed_stats(self, contributions: dict[SeedKey, float] | None = None) -> list[SeedStats]:
        """Every non-DORMANT seed; a contribution from `contributions`, else the last one
        measured into the model's StateLayout, else None."""
        contributions = contributions or {}
        stats = []
        for name, layer in self._layers.items():
            if layer.all_dormant:
                continue  # the common case: no buffer read
            infos = [layer.seed_info(i) for i in range(layer.num_seeds)]
            errors = layer.layout.error_count.tolist()
            measured = layer.layout.contribution.tolist()
            for info in infos:
                if info.state is SeedState.DORMANT:
                    continue
                value = contributions.get((name, info.seed), measured[info.seed])
                stats.append(
                    SeedStats(
                        layer=name,
                        seed=info.seed,
                        state=cast(SeedStateName, info.state.name),
                        alpha=min(1.0, max(0.0, info.alpha)),
                        kernel_id=info.kernel_id,
                        blend=info.blend.value,
                        contribution=finite_or_none(value),
                        error_count=int(errors[info.seed]),
                    )
                )
        return stats

    # ------------------------------------------------------------- epochs
    def epoch_report(
        self,
        epoch: int,
        step: int,
        train_loss: float | None,
        val_loss: float | None,
        val_accuracy: float | None,
        samples_per_s: float | None,
        contributions: dict[SeedKey, float] | None,
        layer_stats: Sequence[LayerStats] | None = None,
        *,
        decision_point: bool = False,
        answers: Sequence[DecisionTaken] = (),
    ) -> TelemetryReport:
        """Build and publish the `kind="epoch"` report: the epoch's metrics, the latest layer
        statistics (`layer_stats`, else those of the last sampled step or `sample_layers` since
        the previous epoch report, else none), and every non-DORMANT seed."""
        layers = list(layer_stats) if layer_stats is not None else self._latest
        metrics: dict[Metric, float | None] = {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "samples_per_s": samples_per_s,
        }
        report = TelemetryReport.from_measurements(
            job_id=self.job_id,
            epoch=epoch,
            step=step,
            kind="epoch",
            metrics=metrics,
            layers=layers,
            seeds=self.seed_stats(contributions),
            decision_point=decision_point,
            answers=answers,
        )
        # The window is the epoch: stale statistics must not be reported again as current.
        self._latest = []
        self._publish(report)
        return report

    def point_report(
        self,
        epoch: int,
        step: int,
        answers: Sequence[DecisionTaken] = (),
        *,
        decision_point: bool = True,
    ) -> TelemetryReport:
        """Build and publish a `kind="step"` decision point within an epoch: the seeds as they
        are and the latest layer statistics (kept: the epoch report still needs them); no
        metrics, which are measured at the end of the epoch."""
        report = TelemetryReport.from_measurements(
            job_id=self.job_id,
            epoch=epoch,
            step=step,
            kind="step",
            metrics={},
            layers=self._latest,
            seeds=self.seed_stats(),
            decision_point=decision_point,
            answers=answers,
        )
        self._publish(report)
        return report

    def _publish(self, report: TelemetryReport) -> None:
        # Telemetry must not stop training; a failure is logged and counted, and the missing
        # report reads as missing downstream.
        try:
            self.publish(report)
        except Exception:
            self.publish_errors += 1
            log.exception("job %s: publishing a %s report failed", self.job_id, report.kind)


class _GainSample:
    """A layer's inputs and its next layer's output gradients in one sampled step, paired in
    the order the forwards ran; `gain()` is ‖Σ gᵀx‖_F on the device (None when unpaired): the
    loss is a batch mean, so each g already carries its 1/N, and this is on the scale of a weight
    gradient, comparable with `grad_norm`."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.gradients: list[torch.Tensor | None] = []

    def take_input(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self.inputs.append(x.detach().reshape(-1, x.shape[-1]))

    def take_gradient(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        index = len(self.gradients)
        self.gradients.append(None)

        def keep(grad: torch.Tensor) -> None:
            self.gradients[index] = grad.detach().reshape(-1, grad.shape[-1])

        output.register_hook(keep)

    def gain(self) -> torch.Tensor | None:
        pairs = list(zip(self.inputs, self.gradients, strict=False))
        if not pairs or len(self.inputs) != len(self.gradients):
            return None
        total: torch.Tensor | None = None
        for x, g in pairs:
            if g is None or g.shape[0] != x.shape[0]:
                return None
            product = g.T.float() @ x.float()
            total = product if total is None else total + product
        assert total is not None
        return torch.linalg.matrix_norm(total)


def _host_grads(module: nn.Module) -> list[torch.Tensor]:
    # A host is an nn.Linear or nn.Conv2d: its own parameters are its weight and bias. Read
    # only (never part of a graph), so no detach, which would be an op per tensor.
    params = (getattr(module, "weight", None), getattr(module, "bias", None))
    return [p.grad for p in params if isinstance(p, nn.Parameter) and p.grad is not None]


def _norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each gradient, in float32 (a half-precision norm overflows), one foreach
    call per device instead of an op per tensor."""
    norms: list[torch.Tensor | None] = [None] * len(grads)
    for indices in _by_device(grads).values():
        found = torch._foreach_norm([grads[i] for i in indices], 2, dtype=torch.float32)
        for i, norm in zip(indices, found, strict=True):
            norms[i] = norm
    return cast(list[torch.Tensor], norms)


def _read(tensors: Sequence[torch.Tensor | None]) -> list[float | None]:
    """Scalar tensors as floats, one stack and transfer per device instead of one per value
    (stack promotes mixed dtypes: a count stacked with float32 values reads as a float)."""
    values: list[float | None] = [None] * len(tensors)
    for indices in _by_device(tensors).values():
        scalars = [cast(torch.Tensor, tensors[i]) for i in indices]
        stacked = torch.stack([t if t.dim() == 0 else t.reshape(()) for t in scalars])
        for i, value in zip(indices, stacked.tolist(), strict=True):
            values[i] = float(value)
    return values


def _by_device(tensors: Sequence[torch.Tensor | None]) -> dict[torch.device, list[int]]:
    """The indices of `tensors` (None skipped) grouped by device: one op per device."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault(t.device, []).append(i)
    return groups


def _scalar(value: torch.Tensor | float | None) -> float | None:
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else float(value.detach().float().reshape(()).item())
    return float(value)


def _clamp(value: float | None, low: float, high: float | None) -> float | None:
    """Rounding can put a variance a hair below 0 or a fraction a hair past 1."""
    if value is None or math.isnan(value):
        return None
    value = max(low, value)
    return value if high is None else min(high, value)

"""Underfitting or overfitting: what a job's training and validation losses say about adding
capacity. Pure functions of the job's epoch reports, never of time, so a decision point's answer
depends on the reports alone.

- **Overfitting**: over the last `overfit_patience` epoch reports with both losses measured, the
  val_loss rose and the train_loss fell, and together they moved apart by more than
  `overfit_gap` × the val_loss where the rise began (the gap val_loss − train_loss widened by
  that much). The two directions are what tells it from noise on a plateau (where the val_loss
  goes up as often as down); the widening, what tells it from a flat val_loss beside a train
  loss that still creeps down. Once found it stands, whatever the next reports' noise, until the
  val_loss comes back down to where the rise began: the plateau count it leaves behind (every
  rising report is one without a new best) must not read as a call for growth.
- **A stalled train_loss**: since the model last changed (a germination or a verdict), the
  train_loss improved by less than `train_stall_delta` (relative) over `train_stall_epochs`
  epoch reports. A model that does not overfit and cannot lower its own training loss lacks
  capacity: it underfits, even while its val_loss creeps down too slowly to plateau.
- **A narrow layer**: on a layer the job can widen, new hidden units would get at least
  `bottleneck_ratio` times the gradient of the layer's own weights (growth_gain / grad_norm,
  averaged over the reports): the error the next layer sees is correlated with directions of the
  layer's input that its few units, behind their activations and the next layer's weights, do not
  pass on. The loss may still be falling — slowly, through a bottleneck — and a plateau may be
  many epochs away.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.contracts import TelemetryReport
from esper.policy.config import PolicyConfig
from esper.policy.models import EpochLosses, JobState, Overfit


@dataclass(frozen=True)
class Stall:
    epochs: int
    train_from: float
    train_to: float
    improvement: float
    """Relative: (train_from − train_to) / train_from."""


@dataclass(frozen=True)
class Bottleneck:
    layer: str
    ratio: float


def narrow_layer(state: JobState, config: PolicyConfig) -> Bottleneck | None:
    """The widenable layer whose bottleneck score is highest, if it reaches bottleneck_ratio."""
    if config.bottleneck_ratio is None:
        return None
    found = [
        (view.bottleneck_score, -view.order, name)
        for name, view in state.layers.items()
        if view.next_layer is not None
        and not view.full
        and view.bottleneck_score is not None
        and view.bottleneck_score >= config.bottleneck_ratio
    ]
    if not found:
        return None
    ratio, _, name = max(found)
    return Bottleneck(name, ratio)


def record(state: JobState, report: TelemetryReport, config: PolicyConfig) -> None:
    """Keep an epoch report's losses (as many as the longer window needs) and update the
    overfitting verdict."""
    entry = EpochLosses(epoch=report.epoch, train_loss=report.train_loss, val_loss=report.val_loss)
    keep = max(config.overfit_patience, config.train_stall_epochs) + 1
    state.losses = [*state.losses, entry][-keep:]
    _overfit(state, entry, config)


def _overfit(state: JobState, now: EpochLosses, config: PolicyConfig) -> None:
    standing = state.overfit
    if standing is not None:
        if now.val_loss is None:
            return  # not measured: it stands as it was
        if now.val_loss <= standing.val_from:
            state.overfit = None  # back down to where it began rising
            return
        standing.epoch, standing.val_loss, standing.train_loss = (
            now.epoch,
            now.val_loss,
            now.train_loss,
        )
        return
    both = [e for e in state.losses if e.train_loss is not None and e.val_loss is not None]
    n = config.overfit_patience
    if len(both) <= n or both[-1].epoch != now.epoch:
        return
    then = both[-1 - n]
    assert then.val_loss is not None and then.train_loss is not None
    assert now.val_loss is not None and now.train_loss is not None
    rose = now.val_loss - then.val_loss
    fell = then.train_loss - now.train_loss
    if rose > 0 and fell > 0 and rose + fell > config.overfit_gap * abs(then.val_loss):
        state.overfit = Overfit(
            since_epoch=now.epoch,
            epochs=n,
            val_from=then.val_loss,
            train_from=then.train_loss,
            epoch=now.epoch,
            val_loss=now.val_loss,
            train_loss=now.train_loss,
        )


def overfit_note(overfit: Overfit) -> str:
    rising = overfit.epoch - overfit.since_epoch + overfit.epochs
    train = "unmeasured" if overfit.train_loss is None else f"{overfit.train_loss:.4g}"
    return (
        f"overfitting: val loss {overfit.val_loss:.4g} rising for {rising} epochs (from "
        f"{overfit.val_from:.4g}) while train loss falls ({overfit.train_from:.4g} → {train}); "
        f"no capacity added to an overfitting model until the val loss is back to "
        f"{overfit.val_from:.4g}"
    )


def train_stall(state: JobState, config: PolicyConfig) -> Stall | None:
    """The stalled train_loss at the latest epoch report, or None (improving, not measured, or
    too few reports since the model last changed)."""
    since = state.model_epoch
    measured = [
        e for e in state.losses if e.train_loss is not None and (since is None or e.epoch >= since)
    ]
    n = config.train_stall_epochs
    if len(measured) <= n or measured[-1].epoch != state.last_epoch:
        return None
    then, now = measured[-1 - n].train_loss, measured[-1].train_loss
    assert then is not None and now is not None
    if then <= 0:
        return None  # a loss of 0 has nothing left to learn
    improvement = (then - now) / then
    if improvement >= config.train_stall_delta:
        return None
    return Stall(n, then, now, improvement)


def train_progress(state: JobState, config: PolicyConfig) -> str:
    """The train_loss trend in words, for a note that says why nothing triggered growth."""
    since = state.model_epoch
    measured = [
        e.train_loss
        for e in state.losses
        if e.train_loss is not None and (since is None or e.epoch >= since)
    ]
    n = config.train_stall_epochs
    if not measured or state.losses[-1].train_loss is None:
        return "train_loss not measured"
    if len(measured) <= n:
        return f"train_loss: {len(measured) - 1} of the {n} epochs its stall window needs"
    then, now = measured[-1 - n], measured[-1]
    assert then is not None and now is not None
    if then <= 0:
        return "train_loss at 0: nothing left to learn"
    change = (then - now) / then
    return (
        f"train_loss improving ({then:.4g} → {now:.4g}: {change:.1%} over {n} epochs, "
        f"≥ train_stall_delta {config.train_stall_delta:.1%})"
    )

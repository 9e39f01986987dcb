"""The best epoch (`training.keep_best`): the epoch with the highest validation accuracy so far,
its weights kept in `best.pt` beside the checkpoint.

`best.pt` is written (atomically) at every epoch that beats the best so far strictly, before that
epoch's checkpoint, and names its epoch: the checkpoint records the best epoch too, so a job
resumed from it keeps its best. With `keep_best` off the best epoch is still followed (it is
reported from the history) but no weights are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from esper.contracts import JobMetrics
from tolaria import checkpoint

log = logging.getLogger("tolaria.job")


class BestEpoch:
    def __init__(self, path: Path, *, keep: bool, header: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.keep = keep
        self.header = header
        """What the file holds besides the weights (job id, spec, layers), as the checkpoint."""
        self.epoch: int | None = None
        self.val_accuracy: float | None = None

    def consider(self, epoch: int, val_accuracy: float, model: nn.Module) -> bool:
        """`epoch` has been measured: keep it if it beats the best so far. Returns whether it
        did."""
        if self.val_accuracy is not None and val_accuracy <= self.val_accuracy:
            return False
        if self.keep:
            checkpoint.save(
                self.path,
                {
                    **self.header(),
                    "epoch": epoch,
                    "val_accuracy": val_accuracy,
                    "model": model.state_dict(),
                },
            )
        self.epoch, self.val_accuracy = epoch, val_accuracy
        return True

    def load_weights(self, model: nn.Module) -> None:
        """Load the best epoch's weights (and seeds) into `model`, a model of the job's build."""
        state = checkpoint.load(self.path)
        if state is None:
            raise FileNotFoundError(f"no best weights at {self.path}")
        model.load_state_dict(state["model"])

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_accuracy": self.val_accuracy}

    def load_state_dict(self, state: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
        """From the checkpoint; one from before best epochs were kept reads the history."""
        if state is not None:
            self.epoch, self.val_accuracy = state.get("epoch"), state.get("val_accuracy")
        else:
            for row in history:
                accuracy = row.get("val_accuracy")
                if accuracy is not None and (
                    self.val_accuracy is None or accuracy > self.val_accuracy
                ):
                    self.epoch, self.val_accuracy = int(row["epoch"]), float(accuracy)
        if self.keep and self.epoch is not None and not self.path.exists():
            # An old checkpoint, or the file lost: the best epoch's weights are gone, so the
            # best is followed from here on and measured only if a later epoch beats it.
            log.warning(
                "the best epoch's weights (%s) are missing; keeping the next best", self.path
            )
        self._adopt_file_epoch()

    def _adopt_file_epoch(self) -> None:
        """A crash between `best.pt` and the checkpoint after it leaves the file one epoch ahead:
        the file's weights are what the job measures, so its epoch is the one to report (the
        resumed job trains that epoch again and, deterministically, gets the same weights)."""
        if not self.keep or not self.path.exists():
            return
        state = checkpoint.load(self.path)
        if state is None or state.get("epoch") == self.epoch:
            return
        self.epoch, self.val_accuracy = int(state["epoch"]), float(state["val_accuracy"])
        log.warning("the best weights on disk are of epoch %d; keeping them", self.epoch)


def summary(metrics: JobMetrics, epochs_done: int, epochs: int) -> str:
    """The best epoch next to the last, as the job's log ends (epochs counted from 1, as the
    log's epoch lines; `best_epoch` in the metrics counts from 0)."""
    last = f"val acc {_fmt(metrics.val_accuracy)}, test acc {_fmt(metrics.test_accuracy)}"
    if metrics.best_epoch is None:
        return f"last (epoch {epochs_done}/{epochs}): {last}"
    best = f"val acc {_fmt(metrics.best_val_accuracy)}, test acc {_fmt(metrics.best_test_accuracy)}"
    return (
        f"best epoch {metrics.best_epoch + 1}/{epochs}: {best}; "
        f"last (epoch {epochs_done}/{epochs}): {last}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

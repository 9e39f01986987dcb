"""Checkpoints: written atomically once per epoch, read back to resume a job or to download.

`model` is the wrapped model's state_dict: `esper.wrap` a freshly built model of the job's spec
and `load_state_dict` it, and its seeds come back (kernels re-resolved by id through the cache).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from esper.files import atomic_write

log = logging.getLogger("tolaria.checkpoint")
FORMAT = 1


def path_for(work_dir: Path, job_id: str) -> Path:
    return work_dir / "jobs" / job_id / "checkpoint.pt"


def best_path_for(work_dir: Path, job_id: str) -> Path:
    """The weights of the job's best validation epoch (`training.keep_best`), same format."""
    return work_dir / "jobs" / job_id / "best.pt"


def save(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a crash leaves the previous checkpoint intact."""
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    # weights_only: a checkpoint holds tensors and plain data, never code to run.
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
    return state


def group_states(optimizer: torch.optim.Optimizer) -> dict[str, list[dict[str, Any]]]:
    """Per-parameter optimizer state by param-group name: seeds join and leave the optimizer,
    so positions shift between runs; names (`host`, `seed:<layer>:<i>`) do not."""
    saved: dict[str, list[dict[str, Any]]] = {}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name is None:
            continue
        saved[name] = [dict(optimizer.state.get(p, {})) for p in group["params"]]
    return saved


def restore_group_states(
    optimizer: torch.optim.Optimizer, saved: dict[str, list[dict[str, Any]]]
) -> None:
    for group in optimizer.param_groups:
        states = saved.get(group.get("name", ""))
        if states is None or len(states) != len(group["params"]):
            continue
        for param, state in zip(group["params"], states, strict=True):
            shapes_fit = all(
                not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == param.shape
                for v in state.values()
            )
            if shapes_fit and state:
                optimizer.state[param] = {
                    k: v.to(param.device) if isinstance(v, torch.Tensor) else v
                    for k, v in state.items()
                }
            elif state:
                log.warning(
                    "optimizer state of group %s does not fit; starting it afresh", group["name"]
                )

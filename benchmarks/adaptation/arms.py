"""The arms' job specs and the rules that size and schedule them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from report import Run
from tasks import SPLIT, Task

from esper.stack import SHORT_JOB_POLICY

POLICY: Mapping[str, str] = SHORT_JOB_POLICY
"""Tamiyo's windows shrunk to jobs of 16–24 epochs (as the demo and the closed-loop test run
it); everything else is Tamiyo's default policy."""
SEEDS_PER_LAYER = 2
MAX_SEEDS = 4
RAMP_STEPS = 20


def job_spec(
    task: Task, run: Run, epochs: int, schedule: list[dict[str, Any]] | None
) -> dict[str, Any]:
    morph: dict[str, Any] = {"enabled": False}
    if run.arm in ("adaptive", "fixed-schedule"):
        morph = {
            "enabled": True,
            "seeds_per_layer": SEEDS_PER_LAYER,
            "max_seeds": MAX_SEEDS,
            "ramp_steps": RAMP_STEPS,
        }
        if run.arm == "fixed-schedule":
            morph |= {"controller": "schedule", "schedule": schedule or []}
    return {
        "name": f"adapt-{task.name}-{run.arm}-{run.seed}",
        "model": run.model,
        "dataset": {**task.dataset, "split": {**SPLIT, "seed": run.seed}},
        "training": {
            "epochs": epochs,
            "batch_size": task.batch_size,
            "lr": task.lr,
            "seed": run.seed,
            "device": "cpu",
            "telemetry_every_steps": 10,  # gradient norms for Tamiyo's layer signal
        },
        "morphogenesis": morph,
    }


def fixed_schedule(adaptive: list[Run], epochs: int) -> list[dict[str, Any]]:
    """The rule of fixed-schedule: the germinations (layer, blueprint) of the adaptive seed
    with the median number of them (ties: the lower seed), in their order, at evenly spaced
    epochs — germination k of n after epoch round((k + 1) · E / (n + 1)) − 1 — the same for
    every seed; at most SEEDS_PER_LAYER per layer and MAX_SEEDS in all (a fixed schedule
    retires nothing, so it cannot reuse a slot)."""
    done = sorted((r for r in adaptive if r.germinations is not None), key=lambda r: r.seed)
    if not done:
        return []
    ranked = sorted(done, key=lambda r: (len(r.germinations or []), r.seed))
    chosen = ranked[(len(ranked) - 1) // 2].germinations or []
    picked: list[tuple[str, str]] = []
    for _, layer, blueprint in chosen:
        if len(picked) < MAX_SEEDS and sum(p[0] == layer for p in picked) < SEEDS_PER_LAYER:
            picked.append((layer, blueprint))
    n = len(picked)
    return [
        {
            "epoch": min(epochs - 2, max(0, round((k + 1) * epochs / (n + 1)) - 1)),
            "layer": layer,
            "blueprint": blueprint,
        }
        for k, (layer, blueprint) in enumerate(picked)
    ]

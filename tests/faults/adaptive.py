"""What the adaptive fault tests share: the job (an underfitting net that Tamiyo grows within a
few epochs), the policy that makes it grow early, and the check that a job came through a fault
whole. Imported by name: conftest puts this directory on the path."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx
import redis
import torch
from faulthelpers import logs

from esper.bus import FIELD
from esper.contracts import DecisionTaken, Envelope, SeedTransition

EPOCHS = 20

POLICY = {
    "TAMIYO_WARMUP_EPOCHS": "2",
    "TAMIYO_PATIENCE": "1",
    "TAMIYO_MIN_DELTA": "0.01",
    "TAMIYO_EVALUATION_EPOCHS": "2",
    "TAMIYO_RAMP_STEPS": "10",
    "TAMIYO_RETIRE_RAMP_STEPS": "10",
    "TAMIYO_COOLDOWN_EPOCHS": "1",
}
"""An eager controller: a fault test needs growth to start within a few epochs, and to have
seeds moving through their lifecycle when the fault strikes; whether growth pays is the closed
loop's question (tests/integration/test_closed_loop.py), not this suite's."""

STUCK = {"ALLOCATED", "LOADING"}
"""A seed's states between a germination's start and its kernel being in place: a job that ends
with a seed in one of them lost track of a germination half-way."""


def adaptive_job(name: str, hidden: tuple[int, ...] = (2, 2)) -> dict[str, Any]:
    """Two concentric circles and a net too narrow to enclose the inner one: it plateaus within
    a few epochs, and Tamiyo germinates. ~0.4 s an epoch on one CPU thread: slow enough that
    a fault aimed at a moment of the job lands before it ends, even on an idle machine."""
    return {
        "name": name,
        "model": {"kind": "mlp", "hidden": list(hidden), "activation": "tanh"},
        "dataset": {"kind": "circles", "samples": 4000, "noise": 0.1, "seed": 0},
        "training": {
            "epochs": EPOCHS,
            "batch_size": 8,
            "lr": 0.01,
            "seed": 0,
            "telemetry_every_steps": 10,
        },
        "morphogenesis": {"enabled": True, "seeds_per_layer": 2, "ramp_steps": 10},
    }


def germinated(view: dict[str, Any]) -> bool:
    """A seed was germinated and is past loading: the lifecycle is under way."""
    return any(s["state"] not in STUCK for s in view["seeds"])


@dataclass
class JobRecord:
    """Everything the stack kept about one job, read after it ended."""

    view: dict[str, Any]
    checkpoint: dict[str, Any]
    answers: list[DecisionTaken]
    """The job's answers to Tamiyo's decisions, from the events stream, in order."""
    transitions: list[SeedTransition]
    logs: str

    def applied(self, action: str) -> list[DecisionTaken]:
        return [a for a in self.answers if a.action == action and a.outcome == "applied"]


def job_record(client: httpx.Client, redis_url: str, prefix: str, job_id: str) -> JobRecord:
    view = client.get(f"/jobs/{job_id}").json()
    state = torch.load(
        io.BytesIO(client.get(f"/jobs/{job_id}/checkpoint").content), weights_only=True
    )
    answers: list[DecisionTaken] = []
    transitions: list[SeedTransition] = []
    bus = redis.Redis.from_url(redis_url)
    try:
        for _, fields in bus.xrange(f"{prefix}:events"):
            message = Envelope.decode(fields[FIELD]).current()
            if getattr(message, "job_id", None) != job_id:
                continue
            if isinstance(message, DecisionTaken):
                answers.append(message)
            elif isinstance(message, SeedTransition):
                transitions.append(message)
    finally:
        bus.close()
    return JobRecord(view, state, answers, transitions, logs(client, job_id))


def assert_came_through(record: JobRecord) -> None:
    """The promises of the fault suite: SUCCEEDED, every epoch once, the record agreeing with
    the checkpoint, no decision applied twice, no seed stuck half-germinated, and growth that
    happened (the fault struck an adaptive job, not a plain one)."""
    view, state = record.view, record.checkpoint
    assert view["status"] == "SUCCEEDED", f"{view}\n{record.logs[-4000:]}"
    assert [entry["epoch"] for entry in state["history"]] == list(range(EPOCHS)), state["history"]
    assert view["progress"]["epoch"] == state["epoch"] == EPOCHS
    assert view["metrics"]["val_accuracy"] == state["metrics"]["val_accuracy"]
    finished_epochs = [
        int(line.split("tolaria.job: epoch ")[1].split("/")[0])
        for line in record.logs.splitlines()
        if "tolaria.job: epoch " in line
    ]
    assert len(finished_epochs) == len(set(finished_epochs)), finished_epochs
    # A job resumed from a checkpoint taken before a point's answer was executed asks that point
    # again and executes the same answer: its decisions may be answered again, identically,
    # never applied a second time or differently.
    outcomes: dict[str, set[tuple[object, ...]]] = defaultdict(set)
    for answer in record.answers:
        outcomes[answer.decision_id].add((answer.outcome, answer.layer, answer.seed))
    twice = {d: o for d, o in outcomes.items() if len(o) > 1}
    assert not twice, f"decisions answered differently: {twice}\n{record.answers}"
    applied = record.applied("germinate")
    live = [s for s in view["seeds"] if s["state"] != "DORMANT"]
    assert len(live) <= len({a.decision_id for a in applied}), (live, applied)
    assert record.applied("germinate"), f"nothing germinated: {record.answers}"
    stuck = [s for s in view["seeds"] if s["state"] in STUCK]
    assert not stuck, f"seeds left half-germinated: {stuck}"

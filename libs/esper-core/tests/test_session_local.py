"""`esper.session(..., controller="local")`: a user's own plain training loop, on a model that is
not in Tolaria's zoo (a small Conv1d classifier) and 1-D signals generated here, grows with the
heuristic policy in this process — no stack, no Redis — and does so deterministically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import esper
from esper.client import ServiceUrls
from esper.exceptions import ConfigError, ServiceUnreachableError
from esper.kasmina import KasminaLayer
from esper.policy import derive_decision_id
from esper.sessions import Run
from esper.testing.signals import LENGTH, SHORT_WINDOWS, conv1d_classifier, sinusoids

EPOCHS = 12
BATCH = 32
POLICY = SHORT_WINDOWS


signals = sinusoids
classifier = conv1d_classifier


@dataclass
class Outcome:
    decisions: Sequence[tuple[int, int, str, str, str, str | None, str]]
    """(epoch, step, decision id, action, layer, blueprint, outcome) of every decision."""
    accuracy: float
    run: Run
    model: nn.Sequential
    seeds_seen: int


def train(torch_seed: int) -> Outcome:
    """The user's script: their model, their optimizer, their loop; three calls to Esper."""
    torch.manual_seed(torch_seed)
    data = torch.Generator().manual_seed(0)
    x, y = signals(384, data)
    val_x, val_y = signals(192, data)
    model = classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            value = float((model(val_x).argmax(dim=1) == val_y).float().mean())
        model.train()
        return value

    seeds_seen = 0
    with esper.session(
        model,
        optimizer,
        name="conv1d-signals",
        controller="local",
        evaluate=accuracy,
        policy=POLICY,
        # A widening seed's first weights from the gradients on a fixed batch.
        loss_on_sample=lambda: loss_fn(model(x[:128]), y[:128]),
    ) as run:
        for _ in range(EPOCHS):
            order = torch.randperm(len(y))
            total = 0.0
            for begin in range(0, len(y), BATCH):
                index = order[begin : begin + BATCH]
                optimizer.zero_grad()
                with run.training_step():
                    loss = loss_fn(model(x[index]), y[index])
                    loss.backward()
                optimizer.step()
                run.step(loss)
                total += loss.item()
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model(val_x), val_y))
            model.train()
            run.end_epoch(
                train_loss=total / math.ceil(len(y) / BATCH),
                val_loss=val_loss,
                val_accuracy=accuracy(),
            )
            seeds_seen = max(seeds_seen, len(run.seeds()))
    decisions = [
        (
            d.epoch,
            d.step,
            d.decision.decision_id,
            d.decision.action,
            d.decision.layer,
            d.decision.blueprint,
            d.taken.outcome,
        )
        for d in run.decisions
    ]
    return Outcome(decisions, accuracy(), run, model, seeds_seen)


def test_a_plain_loop_grows_its_own_conv1d_model_deterministically() -> None:
    first = train(torch_seed=7)

    germinated = [d for d in first.decisions if d[3] == "germinate" and d[6] == "applied"]
    assert germinated, first.decisions
    assert first.seeds_seen >= 1
    # Decided at an epoch's point, with the id Tamiyo would give it for the same point.
    epoch, step, decision_id = germinated[0][:3]
    assert decision_id == derive_decision_id("conv1d-signals", f"point:epoch:{epoch}:{step}", 0)
    assert step == (epoch + 1) * math.ceil(384 / BATCH)
    # The user's own model object is the grown model: wrapped in place, and it still runs.
    run, model = first.run, first.model
    assert run.morphable.model is model
    assert isinstance(model[0], KasminaLayer) and isinstance(model[8], KasminaLayer)
    assert model(torch.randn(5, 2, LENGTH)).shape == (5, 3)
    # Sampled steps measured the layers, gradients included (the policy ranks layers by them).
    steps = [r for r in run.reports if r.kind == "step"]
    assert steps and all(not r.decision_point for r in steps)
    assert any(s.grad_norm is not None for r in steps for s in r.layers)
    assert run.should_stop is False
    with pytest.raises(ConfigError, match="closed"):
        run.step()

    # Widening seeds started from the data: on a Linear layer along the error's directions, on a
    # Conv1d layer (no data init for convs) with their compiled fan-in, and the reason says so.
    widened = [d.taken.reason for d in run.decisions if d.decision.blueprint == "widen"]
    assert widened and all("fan-in" in reason for reason in widened)
    for d in run.decisions:
        if d.decision.blueprint == "widen" and d.taken.outcome == "applied":
            linear = isinstance(model.get_submodule(d.decision.layer), KasminaLayer) and (
                model.get_submodule(d.decision.layer).signature.kind == "linear"
            )
            assert ("singular direction" in d.taken.reason) == linear, d.taken.reason

    second = train(torch_seed=7)
    assert second.decisions == first.decisions
    assert second.accuracy == first.accuracy


def test_the_stack_controller_refuses_local_options_and_an_unreachable_stack() -> None:
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="Tamiyo's policy decides"):
        esper.session(
            model, optimizer, name="r", controller="stack", evaluate=lambda: 0.0, policy=POLICY
        )
    with pytest.raises(ConfigError, match=r"'local' .* or 'stack'"):
        esper.session(model, optimizer, name="r", controller="tamiyo", evaluate=lambda: 0.0)
    nowhere = ServiceUrls(*["http://127.0.0.1:9"] * 4)  # the discard port: nothing listens
    with pytest.raises(ServiceUnreachableError, match="tolaria"):
        esper.session(
            model, optimizer, name="r", controller="stack", evaluate=lambda: 0.0, urls=nowhere
        )
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())  # left untouched


def test_a_session_needs_an_evaluate_callable() -> None:
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="evaluate"):
        esper.session(model, optimizer, name="r")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="evaluate must be a callable"):
        esper.session(model, optimizer, name="r", evaluate=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a valid run name"):
        esper.session(model, optimizer, name="no spaces", evaluate=lambda: 0.0)
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())


def test_decision_points_every_k_steps_are_asked_within_the_epoch() -> None:
    """`decide_every_steps`: a point every K steps, reported and answered like the epoch's (the
    heuristic decides at epochs' points only, from their validation metrics)."""
    torch.manual_seed(3)
    x, y = signals(96, torch.Generator().manual_seed(1))
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    with esper.session(
        model, optimizer, name="every-k", evaluate=lambda: 0.0, decide_every_steps=2
    ) as run:
        for _ in range(2):
            for begin in range(0, len(y), BATCH):
                optimizer.zero_grad()
                with run.training_step():
                    loss = loss_fn(model(x[begin : begin + BATCH]), y[begin : begin + BATCH])
                    loss.backward()
                optimizer.step()
                run.step(loss)
            assert run.end_epoch(train_loss=loss.item()) == []
    points = [(r.kind, r.epoch, r.step) for r in run.reports if r.decision_point]
    assert points == [
        ("step", 0, 2),
        ("epoch", 0, 3),
        ("step", 1, 4),
        ("step", 1, 6),
        ("epoch", 1, 6),
    ]
    assert run.controller.state.answers.keys() >= {"step:1:4", "epoch:1:6"}

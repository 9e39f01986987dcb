"""Your own model and your own training loop, grown by Esper.

A 1-D CNN that is in no zoo, on noisy sinusoids (three frequencies, two channels) generated
here, trained by a plain PyTorch loop; `esper.session` adds four calls to it.

    .venv/bin/python examples/own_loop.py                     # the policy in this process
    .venv/bin/python examples/own_loop.py --controller stack  # Tamiyo (`esper up --short-jobs`)

With `--controller stack` the run is a job of the stack: `esper jobs list` shows it, Nissa
charts it, `esper jobs stop <id>` ends the loop. The last line is `RESULT {json}`: the
decisions (epoch, step, action, layer, blueprint, outcome) and the final validation accuracy.
Same seed, same decisions at the same steps, whichever controller answers.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

import esper
from esper.policy import PolicyConfig
from esper.stack import SHORT_JOB_POLICY

LENGTH = 64
BATCH = 32


def signals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes 0, 1, 2: sin and cos at 3, 5 and 7 cycles, random phase, under noise."""
    y = torch.randint(0, 3, (n,), generator=generator)
    t = torch.linspace(0.0, 1.0, LENGTH)
    cycles = torch.tensor([3.0, 5.0, 7.0])[y]
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    angle = 2 * math.pi * cycles[:, None] * t[None, :] + phase
    x = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    return x + 2.0 * torch.randn(n, 2, LENGTH, generator=generator), y


def classifier() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(4, 4, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller", choices=["local", "stack"], default="local")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--name", default="own-loop")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
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

    # The stack's Tamiyo runs the short-job windows (`esper up --short-jobs`); the local
    # policy gets the same ones.
    with esper.session(
        model,
        optimizer,
        name=args.name,
        controller=args.controller,
        evaluate=accuracy,
        epochs=args.epochs,
        loss_on_sample=lambda: loss_fn(model(x[:128]), y[:128]),
        policy=short_job_policy() if args.controller == "local" else None,
    ) as run:
        print(f"JOB {run.job_id}", flush=True)
        for _ in range(args.epochs):
            order = torch.randperm(len(y))
            total, batches = 0.0, 0
            for begin in range(0, len(y), BATCH):
                index = order[begin : begin + BATCH]
                optimizer.zero_grad()
                with run.training_step():
                    loss = loss_fn(model(x[index]), y[index])
                    loss.backward()
                optimizer.step()
                run.step(loss)
                total, batches = total + loss.item(), batches + 1
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model(val_x), val_y))
            model.train()
            run.end_epoch(train_loss=total / batches, val_loss=val_loss, val_accuracy=accuracy())
            print(f"epoch {run.epoch}: val accuracy {accuracy():.3f}, seeds {len(run.seeds())}")
            if run.should_stop:
                print("stop requested: leaving the loop", flush=True)
                break
    print(result_line(run, accuracy()), flush=True)


def result_line(run: esper.sessions.Run, val_accuracy: float) -> str:
    """`RESULT {json}`: the run's job, its decisions (epoch, step, action, layer, blueprint,
    outcome) and the final validation accuracy."""
    decisions = [
        [
            d.epoch,
            d.step,
            d.decision.action,
            d.decision.layer,
            d.decision.blueprint,
            d.taken.outcome,
        ]
        for d in run.decisions
    ]
    result = {"job_id": run.job_id, "decisions": decisions, "val_accuracy": val_accuracy}
    return "RESULT " + json.dumps(result)


def short_job_policy() -> PolicyConfig:
    """PolicyConfig with the windows of esper.stack.SHORT_JOB_POLICY (Tamiyo's variables)."""
    return PolicyConfig.model_validate(
        {k.removeprefix("TAMIYO_").lower(): v for k, v in SHORT_JOB_POLICY.items()}
    )


if __name__ == "__main__":
    main()

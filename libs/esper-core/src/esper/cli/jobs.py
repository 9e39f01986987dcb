"""`esper jobs …`: submit, follow, list, inspect, stop, logs, checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from esper.cli.output import console, fail, fmt
from esper.client import Esper
from esper.client.calls import Event
from esper.contracts import JOB_STATUSES, JobView
from esper.specyaml import YamlLimitError, load_spec_yaml

app = typer.Typer(no_args_is_help=True, help="Training jobs on Tolaria.")
Url = Annotated[
    str | None, typer.Option("--url", help="Tolaria's URL (default $ESPER_TOLARIA_URL)")
]


def client(url: str | None = None) -> Esper:
    from esper.client import ServiceUrls

    return Esper(ServiceUrls.from_env(tolaria=url))


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="a job spec, YAML or JSON")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="show progress until it ends")
    ] = False,
    code: Annotated[
        Path | None,
        typer.Option(
            "--code", help="a directory of Python code for `kind: python` entrypoints, sent zipped"
        ),
    ] = None,
    url: Url = None,
) -> None:
    """Submit a job; --follow shows a live progress bar (epoch, loss, accuracy) and seed events."""
    if not spec.is_file():
        fail(f"no such file: {spec}")
    if code is not None and not code.is_dir():
        fail(f"--code: no such directory: {code}")
    text = read_spec(spec)
    with client(url) as esper:
        submitted = esper.submit_yaml(text, code=code)
        verb = "submitted" if submitted.created else "already submitted (same submission_id)"
        console.print(f"{verb}: [bold]{submitted.job_id}[/] ({submitted.status})")
        if follow:
            view = follow_job(esper, submitted.job_id)
            raise typer.Exit(0 if view.status == "SUCCEEDED" else 1)


def read_spec(path: Path) -> str:
    """The spec's text, read here within the bounds Tolaria reads it with (esper.specyaml): an
    alias bomb, deep nesting or broken YAML is one line naming the file, and nothing is sent.
    What the spec says is Tolaria's to validate."""
    try:
        text = path.read_text()
        load_spec_yaml(text)
    except UnicodeDecodeError:
        fail(f"{path}: not a text file")
    except YamlLimitError as err:
        fail(f"{path}: {err}")
    except yaml.YAMLError as err:
        fail(f"{path}: not valid YAML ({' '.join(str(err).split())})")
    return text


def describe_event(event: Event) -> str | None:
    """One line for a seed transition, a decision or a status change; None for the rest."""
    p = event.payload
    if event.type == "event.seed_transition":
        return f"seed {p['layer']}[{p['seed']}] {p['from_state']} → {p['to_state']}: {p['reason']}"
    if event.type == "event.decision_taken":
        return f"decision {p['action']} {p['layer']}: {p['outcome']} — {p['reason']}"
    if event.type == "event.job_status":
        return f"job {p['status']}" + (f": {p['error']}" if p.get("error") else "")
    return None


def follow_job(esper: Esper, job_id: str) -> JobView:
    view = esper.job(job_id)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(job_id, total=view.spec.training.epochs, metrics="")
        for event in esper.events(job_id):
            if event.type == "end":
                break
            if event.type == "telemetry.report" and event.payload.get("kind") == "epoch":
                p = event.payload
                metrics = (
                    f"loss {fmt(p.get('train_loss'))}  val loss {fmt(p.get('val_loss'))}  "
                    f"val acc {fmt(p.get('val_accuracy'), 3)}"
                )
                progress.update(task, completed=p["epoch"] + 1, metrics=metrics)
            line = describe_event(event)
            if line:
                progress.console.print(f"  {line}")
    view = esper.job(job_id)
    show(view)
    return view


def show(view: JobView) -> None:
    m, p = view.metrics, view.progress
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(view.status, "cyan")
    console.print(
        f"[bold]{view.job_id}[/] [{colour}]{view.status}[/] epoch {p.epoch}/{p.epochs}  "
        f"samples/s {fmt(m.samples_per_s, 0)}"
    )
    for line in accuracy_lines(view):
        console.print(f"  {line}")
    if view.error:
        console.print(f"  error: {view.error}")
    for seed in view.seeds:
        console.print(
            f"  seed {seed.layer}[{seed.seed}] {seed.state} α={seed.alpha:.2f} "
            f"{seed.blueprint or seed.kernel_id} contribution {fmt(seed.contribution, 3)}"
        )


def accuracy_lines(view: JobView) -> list[str]:
    """The last epoch's accuracies, the best validation epoch's (whose weights the job keeps) and
    the model's cost. Epochs are counted from 1, as in the progress line and the job's log."""
    m, epochs = view.metrics, view.progress.epochs
    lines = [
        f"last (epoch {view.progress.epoch}/{epochs}): val acc {fmt(m.val_accuracy, 3)}  "
        f"test acc {fmt(m.test_accuracy, 3)}"
    ]
    if m.best_epoch is not None:
        lines.append(
            f"best (epoch {m.best_epoch + 1}/{epochs}): val acc {fmt(m.best_val_accuracy, 3)}  "
            f"test acc {fmt(m.best_test_accuracy, 3)}"
        )
    if m.parameters is not None or m.train_flops is not None:
        params = "–" if m.parameters is None else f"{m.parameters:,}"
        flops = "–" if m.train_flops is None else f"{m.train_flops:.3g}"
        lines.append(f"parameters {params}  training FLOPs {flops}")
    return lines


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help=", ".join(JOB_STATUSES))] = None,
    limit: int = 50,
    url: Url = None,
) -> None:
    """Jobs, newest first."""
    with client(url) as esper:
        page = esper.jobs(status, limit)
    table = Table("job", "name", "status", "epoch", "val acc", "seeds")
    for v in page.items:
        table.add_row(
            v.job_id,
            v.name or "",
            v.status,
            f"{v.progress.epoch}/{v.progress.epochs}",
            fmt(v.metrics.val_accuracy, 3),
            str(len(v.seeds)),
        )
    console.print(table)


@app.command()
def status(
    job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, url: Url = None
) -> None:
    """One job: status, progress, metrics, seeds."""
    with client(url) as esper:
        view = esper.job(job_id)
    if as_json:
        console.print_json(view.model_dump_json())
    else:
        show(view)


@app.command()
def stop(job_id: str, url: Url = None) -> None:
    """Stop a job (a running one stops within a step and keeps its checkpoint)."""
    with client(url) as esper:
        view = esper.stop(job_id)
    console.print(f"{job_id}: {view.status}" + (" (stopping)" if view.status == "RUNNING" else ""))


@app.command()
def logs(
    job_id: str,
    tail: Annotated[int | None, typer.Option(help="last N lines")] = None,
    url: Url = None,
) -> None:
    """The job's log."""
    with client(url) as esper:
        console.out(esper.logs(job_id, tail), end="")


@app.command()
def checkpoint(
    job_id: str,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="default: <job_id>.pt")] = None,
    url: Url = None,
) -> None:
    """Download the job's last checkpoint (load with torch.load(path, weights_only=True))."""
    with client(url) as esper:
        data = esper.checkpoint(job_id)
    path = out or Path(f"{job_id}.pt")
    path.write_bytes(data)
    console.print(f"wrote {path} ({len(data)} bytes)")


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)

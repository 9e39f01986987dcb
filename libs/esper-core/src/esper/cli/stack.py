"""`esper up` (the local stack), `esper stack status`, `esper demo` (the main job)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
from rich.table import Table

from esper.cli.jobs import follow_job
from esper.cli.output import console, fail, fmt
from esper.client import Esper, ServiceUrls
from esper.client.calls import SERVICES
from esper.contracts import RUNNING_SEED_STATES, TERMINAL_JOB_STATUSES
from esper.exceptions import ServiceError
from esper.stack import START_ORDER, LocalStack

stack_app = typer.Typer(no_args_is_help=True, help="The running stack.")


@stack_app.command("status")
def status() -> None:
    """Readiness of every service ($ESPER_<SERVICE>_URL, default localhost:8001–8004)."""
    table = Table("service", "url", "status", "checks")
    down = 0
    with Esper() as esper:
        for name in SERVICES:
            url = esper.urls.of(name)
            try:
                ready = esper.readiness(name)
                checks = ", ".join(
                    f"{k}: {'ok' if v is True else v}" for k, v in ready.get("checks", {}).items()
                )
                table.add_row(name, url, ready["status"], checks)
                down += ready["status"] != "ready"
            except ServiceError as err:
                table.add_row(name, url, "[red]unreachable[/]", err.message[:80])
                down += 1
    console.print(table)
    raise typer.Exit(1 if down else 0)


def _print_urls(stack: LocalStack) -> None:
    table = Table("service", "url")
    for name, url in stack.urls().items():
        table.add_row(name, url)
    console.print(table)


class LogTail:
    """New lines of every service's log file, prefixed by the service's name."""

    COLOURS: ClassVar[dict[str, str]] = {
        "urza": "magenta",
        "tolaria": "cyan",
        "tamiyo": "green",
        "nissa": "yellow",
    }

    def __init__(self, stack: LocalStack) -> None:
        self.files = {name: p.log_path for name, p in stack.services.items()}
        self.offsets = dict.fromkeys(self.files, 0)

    def pump(self) -> None:
        for name, path in self.files.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self.offsets[name])
                    chunk = handle.read()
                    self.offsets[name] = handle.tell()
            except OSError:
                continue
            colour = self.COLOURS.get(name, "white")
            for line in chunk.decode(errors="replace").splitlines():
                console.print(
                    f"[{colour}]{name:8s}[/] {line}", markup=True, highlight=False, soft_wrap=True
                )


def up(
    root: Annotated[Path, typer.Option(help="where the stack keeps its state")] = Path("var/stack"),
    free_ports: Annotated[
        bool, typer.Option(help="free ports instead of 8001–8004 and 6379")
    ] = False,
    services: Annotated[str, typer.Option(help="comma-separated")] = ",".join(START_ORDER),
) -> None:
    """Start Redis and the services as local processes, print their URLs, stream their logs;
    Ctrl-C stops them all."""
    names = [s.strip() for s in services.split(",") if s.strip()]
    stack = LocalStack(root, services=names, fixed_ports=not free_ports)
    console.print(f"starting {', '.join(names)} (state in {root}) …")
    try:
        stack.start()
    except Exception as err:
        fail(f"the stack did not start: {err}")
    _print_urls(stack)
    console.print("streaming logs; Ctrl-C stops the stack")
    tail = LogTail(stack)
    try:
        while True:
            tail.pump()
            dead = [n for n, p in stack.services.items() if not p.running]
            if dead:
                tail.pump()
                stack.stop()
                fail(f"{', '.join(dead)} exited; the stack is stopped")
            time.sleep(0.3)
    except KeyboardInterrupt:
        console.print("stopping …")
    finally:
        stack.stop()
    console.print("stopped")


DEMO_JOB: dict[str, Any] = {
    # Two concentric circles and a 2-2-2-2 tanh MLP: two units a layer cannot enclose a disc, so
    # the host plateaus near 0.8 validation accuracy; a seed that adds hidden units lifts it past
    # 0.95 within the job. (Tolaria's spirals wind four times: the same story takes far longer.)
    "name": "circles-growth",
    "model": {"kind": "mlp", "hidden": [2, 2], "activation": "tanh"},
    "dataset": {"kind": "circles", "samples": 6000, "noise": 0.1, "seed": 0},
    "training": {
        "epochs": 28,
        "batch_size": 32,
        "lr": 0.01,
        "seed": 0,
        "telemetry_every_steps": 10,  # gradient norms: Tamiyo's layer signal
    },
    "morphogenesis": {"enabled": True, "seeds_per_layer": 2, "ramp_steps": 20},
}


def demo(
    root: Annotated[Path, typer.Option(help="where the demo stack keeps its state")] = Path(
        "var/demo"
    ),
    use_running: Annotated[
        bool, typer.Option(help="use the stack at $ESPER_*_URL instead of starting one")
    ] = False,
) -> None:
    """The main job: start the local stack, train the growth demo (a tiny MLP on two circles,
    with Tamiyo germinating seeds when it plateaus) beside the same job without growth, and show
    what the seeds did."""
    stack = None
    if not use_running:
        shutil.rmtree(root, ignore_errors=True)  # each demo starts from an empty stack
        stack = LocalStack(root, services=list(START_ORDER), env=DEMO_ENV)
        console.print(f"starting the local stack (state in {root}) …")
        try:
            stack.start()
        except Exception as err:
            fail(f"the stack did not start: {err}")
        _print_urls(stack)
    try:
        urls = ServiceUrls.from_env(**(stack.urls() if stack else {}))
        with Esper(urls, timeout_s=120) as esper:
            result = run_demo(esper)
    finally:
        if stack is not None:
            stack.stop()
    if not result:
        raise typer.Exit(1)


DEMO_ENV: dict[str, str] = {
    "TAMIYO_WARMUP_EPOCHS": "3",
    "TAMIYO_PATIENCE": "2",
    "TAMIYO_MIN_DELTA": "0.01",
    "TAMIYO_EVALUATION_EPOCHS": "2",
    "TAMIYO_RAMP_STEPS": "20",
    "TAMIYO_RETIRE_RAMP_STEPS": "20",
    "TAMIYO_COOLDOWN_EPOCHS": "1",
    "TAMIYO_KEEP_THRESHOLD": "0.02",
}
"""Tamiyo's defaults are sized for jobs of tens of epochs; these fit the 28-epoch demo."""


def run_demo(esper: Esper) -> bool:
    grow = esper.submit({**DEMO_JOB})
    control = esper.submit(
        {**DEMO_JOB, "name": "spirals-control", "morphogenesis": {"enabled": False}}
    )
    console.print(f"growth job {grow.job_id}, control job {control.job_id} (no growth)")
    grown = follow_job(esper, grow.job_id)
    deadline = time.monotonic() + 600
    plain = esper.job(control.job_id)
    while plain.status not in TERMINAL_JOB_STATUSES and time.monotonic() < deadline:
        time.sleep(0.5)
        plain = esper.job(control.job_id)
    germinated = [s for s in grown.seeds if s.state in RUNNING_SEED_STATES] or grown.seeds
    a, b = grown.metrics.val_accuracy, plain.metrics.val_accuracy
    console.rule("result")
    console.print(f"with growth:    val acc {fmt(a, 3)}  ({len(grown.seeds)} seed(s))")
    for s in grown.seeds:
        console.print(
            f"  seed {s.layer}[{s.seed}] {s.blueprint} {s.state} "
            f"contribution {fmt(s.contribution, 3)}"
        )
    console.print(f"without growth: val acc {fmt(b, 3)}")
    if a is not None and b is not None:
        console.print(
            f"[bold]RESULT growth_val_acc={a:.3f} control_val_acc={b:.3f} "
            f"gain={a - b:+.3f} seeds={len(germinated)}[/]"
        )
    return grown.status == "SUCCEEDED" and plain.status == "SUCCEEDED" and bool(grown.seeds)

"""Does growing a network pay? Each task trains, for every RNG seed, five arms through the real
stack (Urza, Tolaria, Tamiyo as processes; jobs by Tolaria's HTTP API) — see docs/adaptation.md,
which this writes, for the arms and the rules. Progress goes to stderr; the figures end stdout in
one line.

    python benchmarks/adaptation/run.py            # every task, 3 seeds (≈ 5–15 min on 2 cores)
    python benchmarks/adaptation/run.py --quick --out /tmp/adapt   # 1 task, 1 seed, few epochs
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arms import POLICY, fixed_schedule, job_spec
from harness import TERMINAL, Outcome, Stack
from page import Finished, write_page
from report import ARMS, Run
from tasks import TASKS, Task, count_parameters, large, matching, task_named

from esper.stack import LocalStack

REPO = Path(__file__).resolve().parents[2]
STACK_ENV: Mapping[str, str] = {
    "TOLARIA_WORKERS": "2",  # two jobs at once, one thread each: two cores
    "OMP_NUM_THREADS": "1",
    "TOLARIA_LOG_JSON": "false",
    "URZA_LOG_JSON": "false",
    "TAMIYO_LOG_JSON": "false",
}
STALL_S = 900.0
"""No job ended for this long: something is stuck, and the benchmark says so."""
LIVE_STATES = ("ALLOCATED", "LOADING", "ACTIVE", "RETIRING")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------ the runs
class Bench:
    def __init__(self, stack: Stack, tasks: list[Task], seeds: list[int], epochs: int | None):
        self.stack, self.tasks, self.seeds = stack, tasks, seeds
        self.epochs = {t.name: epochs or t.epochs for t in tasks}
        self.total = len(tasks) * len(seeds) * len(ARMS)
        self.started = 0
        self.finished = 0
        self.runs: list[Run] = []
        self.active: dict[str, tuple[Run, Task]] = {}
        self.schedules: dict[str, list[dict[str, Any]]] = {}
        self.t0 = time.monotonic()

    def submit(self, task: Task, run: Run, schedule: list[dict[str, Any]] | None = None) -> None:
        spec = job_spec(task, run, self.epochs[task.name], schedule)
        run.job_id = self.stack.submit(spec)
        self.started += 1
        self.runs.append(run)
        self.active[run.job_id] = (run, task)
        log(
            f"[{self._clock()}] submitted job {self.started}/{self.total}: {task.name} "
            f"{run.arm} seed {run.seed} ({run.job_id})"
        )

    def skip(self, task: Task, arm: str, seed: int, why: str) -> None:
        self.total -= 1
        log(f"[{self._clock()}] skipped {task.name} {arm} seed {seed}: {why}")

    def run(self) -> list[Run]:
        for task in self.tasks:
            for seed in self.seeds:
                for arm, model in (
                    ("static-initial", task.model),
                    ("adaptive", task.model),
                    ("static-large", large(task)),
                ):
                    self.submit(task, Run(task.name, arm, seed, model))
        progress = time.monotonic()
        while self.active:
            if time.monotonic() - progress > STALL_S:
                raise TimeoutError(f"no job ended for {STALL_S:.0f} s: {list(self.active)}")
            time.sleep(2.0)
            for job_id in list(self.active):
                if self.stack.status(job_id) in TERMINAL:
                    run, task = self.active.pop(job_id)
                    self._finish(run, task)
                    self._follow_up(run, task)
                    progress = time.monotonic()
        return self.runs

    def _finish(self, run: Run, task: Task) -> None:
        morph = run.arm in ("adaptive", "fixed-schedule")
        outcome = self.stack.collect(run.job_id, morph)
        run.status = outcome.status
        run.accuracy, run.accuracy_source = outcome.accuracy, outcome.accuracy_source
        run.flops = outcome.metrics.get("train_flops")
        run.parameters, run.parameters_counted = self._parameters(outcome, run, task)
        run.val_curve = [float(h["val_accuracy"]) for h in outcome.history]
        run.loaded = len(outcome.loaded)
        if run.arm == "adaptive":
            run.germinations = [(g.epoch, g.layer, g.blueprint) for g in outcome.germinations]
        run.tamiyo_applied = outcome.tamiyo_decisions
        if run.arm == "fixed-schedule" and outcome.tamiyo_decisions:
            log(
                f"  warning: the fixed-schedule job {run.job_id} applied "
                f"{outcome.tamiyo_decisions} of Tamiyo's decisions: the schedule was not its "
                "only controller"
            )
        self.finished += 1
        acc = "n/a" if run.accuracy is None else f"{100 * run.accuracy:.1f}%"
        counted = " (counted)" if run.parameters_counted else ""
        extra = f", {len(run.germinations)} germinations" if run.germinations is not None else ""
        log(
            f"[{self._clock()}] done {self.finished}/{self.total}: {task.name} {run.arm} seed "
            f"{run.seed}: {run.status}, test accuracy {acc} ({run.accuracy_source}), "
            f"{run.parameters} parameters{counted}{extra}"
        )
        if run.status != "SUCCEEDED":
            log(f"  {outcome.error}\n{self.stack.logs(run.job_id)[-2000:]}")

    def _parameters(self, outcome: Outcome, run: Run, task: Task) -> tuple[int | None, bool]:
        """Tolaria's `parameters` where it reports them; otherwise the host's (counted from the
        spec) plus each live seed's kernel's (Urza's `params`)."""
        reported = outcome.metrics.get("parameters")
        if reported is not None:
            return int(reported), False
        if outcome.status != "SUCCEEDED":
            return None, True
        seeds = sum(
            self.stack.kernel_params(s["kernel_id"])
            for s in outcome.seeds
            if s.get("kernel_id") and s["state"] in LIVE_STATES
        )
        return count_parameters(run.model, task) + seeds, True

    def _follow_up(self, run: Run, task: Task) -> None:
        """What waits on the adaptive arm: static-same-size for the seed, fixed-schedule for
        every seed once all of the task's adaptive runs have ended."""
        if run.arm != "adaptive":
            return
        if run.parameters is None:
            self.skip(task, "static-same-size", run.seed, "the adaptive job failed")
        else:
            self.submit(
                task, Run(task.name, "static-same-size", run.seed, matching(task, run.parameters))
            )
        adaptive = [r for r in self.runs if r.task == task.name and r.arm == "adaptive"]
        if len(adaptive) < len(self.seeds) or any(r.job_id in self.active for r in adaptive):
            return
        schedule = fixed_schedule(adaptive, self.epochs[task.name])
        self.schedules[task.name] = schedule
        for seed in self.seeds:
            if not schedule:
                self.skip(task, "fixed-schedule", seed, "the adaptive arm germinated nothing")
                continue
            fixed = Run(task.name, "fixed-schedule", seed, task.model, scheduled=len(schedule))
            self.submit(task, fixed, schedule)

    def _clock(self) -> str:
        return f"{time.monotonic() - self.t0:6.0f}s"


# ----------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 task, 1 seed, 10 epochs")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="override every task's epochs")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs",
        help="where adaptation.md and adaptation/ go (default: docs/)",
    )
    parser.add_argument(
        "--page-only",
        action="store_true",
        help="train nothing: write the page again from <out>/adaptation/results.json",
    )
    args = parser.parse_args(argv)
    if args.page_only:
        finished = Finished.load(args.out / "adaptation" / "results.json")
    else:
        finished = _train(args)
    line = write_page(args.out, finished)
    log(f"wrote {args.out / 'adaptation.md'}")
    failed = sum(r.status != "SUCCEEDED" for r in finished.runs)
    minutes = finished.wall_s / 60
    print(f"{line} jobs={len(finished.runs)} failed={failed} minutes={minutes:.1f}")
    return 1 if failed else 0


def _train(args: argparse.Namespace) -> Finished:
    names = args.tasks or ([TASKS[0].name] if args.quick else [t.name for t in TASKS])
    tasks = [task_named(n) for n in names]
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = args.epochs or (10 if args.quick else None)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as root:
        data_dir = Path(root) / "data"
        data_dir.mkdir()
        for task in tasks:
            if task.write is not None:
                task.write(data_dir)
        log(f"starting the stack in {root}")
        env = {**STACK_ENV, **POLICY}
        with LocalStack(
            root, services=["urza", "tolaria", "tamiyo"], env=env, data_dir=data_dir
        ) as local:
            stack = Stack(local.url("tolaria"), local.url("tamiyo"), local.url("urza"))
            try:
                bench = Bench(stack, tasks, seeds, epochs)
                bench.run()
            finally:
                stack.close()
    wall = time.monotonic() - start
    return Finished(bench.runs, tasks, seeds, bench.schedules, args.quick, wall)


if __name__ == "__main__":
    # A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so LocalStack stops the services:
    # Python's default handler would leave them running, and Tolaria restarting its jobs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())

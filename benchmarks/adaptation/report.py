"""From finished runs to figures: per task and arm the mean ± sd of test accuracy, parameters,
training FLOPs and germinations; the acceptance lines; the table, the plots and the page."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ARMS = ("static-initial", "adaptive", "static-same-size", "static-large", "fixed-schedule")


@dataclass
class Run:
    """One job of the benchmark and what it measured (None where the job failed)."""

    task: str
    arm: str
    seed: int
    model: dict[str, object]
    accuracy: float | None = None
    accuracy_source: str = "last"
    parameters: int | None = None
    parameters_counted: bool = False
    """True: Tolaria reported no `parameters`; the benchmark counted host + live seeds."""
    flops: float | None = None
    germinations: list[tuple[int, str, str]] | None = None
    """(epoch, layer, blueprint) of Tamiyo's applied germinations (adaptive arm)."""
    loaded: int = 0
    """Seeds the job allocated, from its own events (any arm with morphogenesis)."""
    scheduled: int = 0
    """Germinations in the arm's fixed schedule."""
    tamiyo_applied: int = 0
    """Tamiyo's decisions the job applied: for fixed-schedule, a sign it was not alone."""
    val_curve: list[float] | None = None
    status: str = "PENDING"
    job_id: str = ""


@dataclass
class Cell:
    """One task × arm over its seeds."""

    accuracy: float | None
    sd: float | None
    parameters: float | None
    flops: float | None
    germinations: float | None
    allocated: float | None
    """Seeds the jobs allocated (their own events), mean: how much of a fixed schedule ran."""
    scheduled: int
    runs: int
    failed: int
    sources: set[str]


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def cell(runs: list[Run]) -> Cell:
    done = [r for r in runs if r.status == "SUCCEEDED" and r.accuracy is not None]
    accuracies = [r.accuracy for r in done if r.accuracy is not None]
    flops = [r.flops for r in done if r.flops is not None]
    germinated = [len(r.germinations) for r in done if r.germinations is not None]
    return Cell(
        accuracy=_mean(accuracies),
        sd=_sd(accuracies),
        parameters=_mean([float(r.parameters) for r in done if r.parameters is not None]),
        flops=_mean(flops) if len(flops) == len(done) else None,
        germinations=_mean([float(g) for g in germinated]) if germinated else None,
        allocated=_mean([float(r.loaded) for r in done]),
        scheduled=max((r.scheduled for r in runs), default=0),
        runs=len(done),
        failed=len(runs) - len(done),
        sources={r.accuracy_source for r in done},
    )


# ---------------------------------------------------------- acceptance
@dataclass
class Verdict:
    underfits: bool | None
    lines: dict[str, str]
    """Each acceptance line: 'met', 'missed' or 'n/a (why)'."""


LINES = (
    "adaptive beats static-initial by > 2× the larger sd",
    "adaptive ≥ static-same-size − 0.5 point",
    "adaptive within 1 point of static-large, ≤ half its parameters, less training compute",
)


def verdict(cells: dict[str, Cell]) -> Verdict:
    """The initial net underfits when a wider static net (static-large or static-same-size)
    beats it by more than twice the larger sd: more capacity helps. The acceptance lines are
    judged only there."""
    initial, adaptive = cells["static-initial"], cells["adaptive"]
    same, big = cells["static-same-size"], cells["static-large"]
    if None in (initial.accuracy, big.accuracy, adaptive.accuracy):
        return Verdict(None, dict.fromkeys(LINES, "n/a (a job failed)"))
    assert initial.accuracy is not None and big.accuracy is not None
    assert adaptive.accuracy is not None
    wider = [c for c in (big, same) if c.accuracy is not None]
    if all(
        (c.accuracy or 0.0) - initial.accuracy <= 2 * max(initial.sd or 0.0, c.sd or 0.0)
        for c in wider
    ):
        return Verdict(False, dict.fromkeys(LINES, "n/a (initial net does not underfit)"))
    lines: dict[str, str] = {}
    margin = 2 * max(initial.sd or 0.0, adaptive.sd or 0.0)
    lines[LINES[0]] = _met(adaptive.accuracy - initial.accuracy > margin)
    if same.accuracy is None:
        lines[LINES[1]] = "n/a (no static-same-size run)"
    else:
        lines[LINES[1]] = _met(adaptive.accuracy >= same.accuracy - 0.005)
    if adaptive.flops is None or big.flops is None:
        lines[LINES[2]] = "n/a (no train_flops reported)"
    elif adaptive.parameters is None or big.parameters is None:
        lines[LINES[2]] = "n/a (no parameters)"
    else:
        lines[LINES[2]] = _met(
            adaptive.accuracy >= big.accuracy - 0.01
            and adaptive.parameters <= 0.5 * big.parameters
            and adaptive.flops < big.flops
        )
    return Verdict(True, lines)


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


# --------------------------------------------------------------- table
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _count(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def table(cells: dict[str, dict[str, Cell]], verdicts: dict[str, Verdict]) -> str:
    head = (
        "| task | arm | test accuracy % (mean ± sd) | metric | parameters | training FLOPs "
        "| germinations | runs |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for task, arms in cells.items():
        for arm in ARMS:
            c = arms.get(arm)
            if c is None:
                rows.append(f"| {task} | {arm} | not run | | | | | 0 |")
                continue
            score = "n/a" if c.accuracy is None else f"{_pct(c.accuracy)} ± {_pct(c.sd)}"
            metric = "/".join(sorted(f"{s}_test" for s in c.sources)) or "n/a"
            germ = "" if c.germinations is None else f"{c.germinations:.1f}"
            if arm == "fixed-schedule" and c.allocated is not None:
                germ = f"{c.scheduled} scheduled, {c.allocated:.1f} allocated"
            runs = f"{c.runs}" + (f" ({c.failed} failed)" if c.failed else "")
            rows.append(
                f"| {task} | {arm} | {score} | {metric} | {_count(c.parameters)} "
                f"| {_count(c.flops)} | {germ} | {runs} |"
            )
    rows.append("")
    rows.append("| task | initial net underfits | " + " | ".join(LINES) + " |")
    rows.append("|---|---|" + "---|" * len(LINES))
    for task, v in verdicts.items():
        under = {True: "yes", False: "no", None: "n/a"}[v.underfits]
        rows.append(f"| {task} | {under} | " + " | ".join(v.lines[line] for line in LINES) + " |")
    return "\n".join(rows)


def figures_line(cells: dict[str, dict[str, Cell]], verdicts: dict[str, Verdict]) -> str:
    """The one line of figures a benchmark of this repo ends with."""
    parts: list[str] = []
    for task, arms in cells.items():
        for arm, c in arms.items():
            if c.accuracy is not None:
                parts.append(f"{task}.{arm}={c.accuracy:.3f}±{c.sd or 0.0:.3f}")
        if task in verdicts:
            met = sum(s == "met" for s in verdicts[task].lines.values())
            parts.append(f"{task}.accepted={met}/{len(LINES)}")
    return " ".join(parts)


# ---------------------------------------------------------------- plot
def plot(task: str, runs: list[Run], path: Path, scheduled: Sequence[int] = ()) -> None:
    """Validation accuracy over epochs, the mean over seeds of each arm; the adaptive arm's
    germinations (every seed's) marked on its curve, and the fixed schedule's (`scheduled`,
    0-based epochs) on the fixed-schedule curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.2))
    for arm in ARMS:
        curves = [r.val_curve for r in runs if r.arm == arm and r.val_curve]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [statistics.fmean(c[e] for c in curves) for e in range(length)]
        (line,) = axes.plot(range(1, length + 1), mean, label=f"{arm} ({len(curves)} seeds)")
        marks: list[int] = []
        if arm == "adaptive":
            marks = [g[0] + 1 for r in runs if r.arm == arm for g in r.germinations or []]
        elif arm == "fixed-schedule":
            marks = [e + 1 for e in scheduled]
        if marks:
            ys = [mean[min(e, length) - 1] for e in marks]
            axes.scatter(
                marks,
                ys,
                marker="v" if arm == "adaptive" else "x",
                s=45,
                color=line.get_color(),
                zorder=3,
                label=f"germination ({arm}{', any seed' if arm == 'adaptive' else ''})",
            )
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation accuracy (mean over seeds)")
    axes.set_title(task)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the curves
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)

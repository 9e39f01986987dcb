"""The HTML job report: loss and accuracy curves and a seed timeline, as inline SVG drawn here.

No JavaScript and nothing fetched: the page renders the same in a browser with no network (and
in headless Chromium for the screenshot test). All three charts share one x axis — training
steps, with each epoch's end marked — so a seed's germination lines up with the loss it changed.
Events that carry no step (a decision answered, a transition without one) are placed by their
time, interpolated between the (time, step) points of the job's telemetry.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import get_args

from esper.contracts import Action
from nissa.reports import DecisionReport, JobReport, SeedReport

WIDTH = 1000
PLOT_LEFT = 150  # room for the timeline's lane labels; the curves use the same margin
PLOT_RIGHT = 30
STATE_COLORS = {
    "ALLOCATED": "#9ecae1",
    "LOADING": "#fdae6b",
    "ACTIVE": "#2ca02c",
    "RETIRING": "#d62728",
    "RECYCLING": "#9467bd",
    "DORMANT": "#e5e5e5",
}
SERIES_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "step": "#aec7e8", "acc": "#17becf"}
MARKERS = {"germinate": "#212121", "keep": "#0d47a1", "retire": "#b71c1c", "set_alpha": "#6d4c41"}
# up-pointing triangle: germinate; down: retire; diamond: keep; small wedge: set_alpha
OUTLINES = {
    "germinate": [(-7, 7), (7, 7), (0, -7)],
    "retire": [(-7, -7), (7, -7), (0, 7)],
    "keep": [(0, -7), (7, 0), (0, 7), (-7, 0)],
    "set_alpha": [(-6, 3), (0, -5), (6, 3)],
}


@dataclass
class Scale:
    lo: float
    hi: float
    p0: float
    p1: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.p0 + (value - self.lo) / span * (self.p1 - self.p0)


class Clock:
    """Time → step, from the job's telemetry points (linear between them, clamped at the ends)."""

    def __init__(self, report: JobReport) -> None:
        points = sorted(
            {(p.ts, p.step) for p in report.epochs} | {(p.ts, p.step) for p in report.steps}
        )
        self.ts = [t for t, _ in points]
        self.steps = [s for _, s in points]

    def step_at(self, ts: float) -> float:
        if not self.ts:
            return 0.0
        i = bisect.bisect_left(self.ts, ts)
        if i <= 0:
            return float(self.steps[0])
        if i >= len(self.ts):
            return float(self.steps[-1])
        t0, t1 = self.ts[i - 1], self.ts[i]
        s0, s1 = self.steps[i - 1], self.steps[i]
        return s0 + (s1 - s0) * ((ts - t0) / (t1 - t0) if t1 > t0 else 1.0)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC"


def _marker_shape(action: str, x: float, y: float, title: str) -> str:
    outline = OUTLINES.get(action, OUTLINES["set_alpha"])
    shape = " ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in outline)
    return (
        f'<polygon class="marker marker-{escape(action)}" points="{shape}" '
        f'fill="{MARKERS.get(action, "#333")}" stroke="#fff" stroke-width="1.5">'
        f"<title>{escape(title)}</title></polygon>"
    )


def _polyline(points: Sequence[tuple[float, float]], cls: str, color: str, width: float) -> str:
    if not points:
        return ""
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(
        f'<circle class="{cls}-point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>'
        for x, y in points
    )
    line = (
        f'<polyline class="curve {cls}" points="{coords}" fill="none" stroke="{color}" '
        f'stroke-width="{width}" stroke-linejoin="round"/>'
    )
    return line + (dots if len(points) <= 60 else "")


class Page:
    def __init__(self, report: JobReport) -> None:
        self.report = report
        self.clock = Clock(report)
        end = max(
            [report.step]
            + [p.step for p in report.epochs]
            + [p.step for p in report.steps]
            + [t.step for s in report.seeds for t in s.transitions if t.step is not None]
        )
        self.x = Scale(0.0, float(max(end, 1)), PLOT_LEFT, WIDTH - PLOT_RIGHT)
        self.end_step = float(max(end, 1))

    # ------------------------------------------------------------------ axes
    def _x_axis(self, top: float, bottom: float) -> str:
        parts = []
        for tick in _nice_ticks(self.x.lo, self.x.hi, 8):
            x = self.x(tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f0f0"/>'
                f'<text x="{x:.1f}" y="{bottom + 14}" font-size="11" text-anchor="middle" '
                f'fill="#555">{_fmt(tick)}</text>'
            )
        for point in self.report.epochs:
            x = self.x(point.step)
            parts.append(
                f'<line class="epoch-end" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                f'stroke="#c8c8c8" stroke-dasharray="3,3"/>'
            )
        parts.append(
            f'<line x1="{PLOT_LEFT}" y1="{bottom}" x2="{WIDTH - PLOT_RIGHT}" y2="{bottom}" '
            f'stroke="#888"/><text x="{WIDTH - PLOT_RIGHT}" y="{bottom + 28}" font-size="11" '
            f'text-anchor="end" fill="#555">training step (dashed: end of an epoch)</text>'
        )
        return "".join(parts)

    def _y_axis(self, y: Scale, label: str) -> str:
        parts = []
        for tick in _nice_ticks(y.lo, y.hi, 4):
            py = y(tick)
            parts.append(
                f'<line x1="{PLOT_LEFT}" y1="{py:.1f}" x2="{WIDTH - PLOT_RIGHT}" y2="{py:.1f}" '
                f'stroke="#f0f0f0"/><text x="{PLOT_LEFT - 8}" y="{py + 4:.1f}" font-size="11" '
                f'text-anchor="end" fill="#555">{_fmt(tick, 3)}</text>'
            )
        parts.append(
            f'<line x1="{PLOT_LEFT}" y1="{y.p1}" x2="{PLOT_LEFT}" y2="{y.p0}" stroke="#888"/>'
            f'<text x="14" y="{(y.p0 + y.p1) / 2:.1f}" font-size="12" fill="#333" '
            f'transform="rotate(-90 14 {(y.p0 + y.p1) / 2:.1f})" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
        return "".join(parts)

    @staticmethod
    def _legend(items: Iterable[tuple[str, str]], y: float) -> str:
        parts, x = [], float(PLOT_LEFT)
        for name, color in items:
            parts.append(
                f'<rect x="{x:.0f}" y="{y - 9}" width="12" height="12" fill="{color}"/>'
                f'<text x="{x + 16:.0f}" y="{y + 1}" font-size="12" fill="#333">'
                f"{escape(name)}</text>"
            )
            x += 26 + 7.0 * len(name) + 1.6 * sum(c.isupper() for c in name)
        return "".join(parts)

    @staticmethod
    def _empty(svg_id: str, height: int, text: str) -> str:
        return (
            f'<svg id="{svg_id}" class="chart empty" width="{WIDTH}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><text x="{WIDTH / 2}" y="{height / 2}" '
            f'text-anchor="middle" fill="#777" font-size="14">{escape(text)}</text></svg>'
        )

    # ---------------------------------------------------------------- charts
    def loss_chart(self) -> str:
        r = self.report
        train = [(p.step, p.train_loss) for p in r.epochs if p.train_loss is not None]
        val = [(p.step, p.val_loss) for p in r.epochs if p.val_loss is not None]
        steps = [(p.step, p.train_loss) for p in r.steps if p.train_loss is not None]
        values = [v for _, v in train + val + steps]
        if not values:
            return self._empty("loss-chart", 120, "no loss reported yet")
        height, top, bottom = 230, 30, 190
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
        y = Scale(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad, bottom, top)

        def pts(series: list[tuple[int, float]]) -> list[tuple[float, float]]:
            return [(self.x(s), y(v)) for s, v in series]

        body = (
            self._x_axis(top, bottom)
            + self._y_axis(y, "loss")
            + _polyline(pts(steps), "step-loss", SERIES_COLORS["step"], 1.5)
            + _polyline(pts(train), "train-loss", SERIES_COLORS["train"], 3)
            + _polyline(pts(val), "val-loss", SERIES_COLORS["val"], 3)
            + self._legend(
                [
                    ("train loss (epoch mean)", SERIES_COLORS["train"]),
                    ("validation loss", SERIES_COLORS["val"]),
                    ("train loss (sampled steps)", SERIES_COLORS["step"]),
                ],
                18,
            )
        )
        return (
            f'<svg id="loss-chart" class="chart" width="{WIDTH}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{body}</svg>'
        )

    def accuracy_chart(self) -> str:
        r = self.report
        acc = [(p.step, p.val_accuracy) for p in r.epochs if p.val_accuracy is not None]
        if not acc:
            return self._empty("accuracy-chart", 120, "no validation accuracy reported yet")
        height, top, bottom = 190, 30, 150
        lo = min(v for _, v in acc)
        y = Scale(max(0.0, math.floor(lo * 10 - 1) / 10), 1.0, bottom, top)
        points = [(self.x(s), y(v)) for s, v in acc]
        body = (
            self._x_axis(top, bottom)
            + self._y_axis(y, "validation accuracy")
            + _polyline(points, "val-accuracy", SERIES_COLORS["acc"], 3)
            + self._legend([("validation accuracy", SERIES_COLORS["acc"])], 18)
        )
        return (
            f'<svg id="accuracy-chart" class="chart" width="{WIDTH}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{body}</svg>'
        )

    def _seed_x(self, ts: float, step: int | None) -> float:
        return float(step) if step is not None else self.clock.step_at(ts)

    def _segments(self, seed: SeedReport) -> list[tuple[float, float, str]]:
        """(from step, to step, state) of each stretch the slot spent out of DORMANT."""
        changes = [(self._seed_x(t.ts, t.step), t.to_state) for t in seed.transitions]
        if not changes:
            changes = [(self.clock.step_at(seed.first_seen), seed.state)]
        changes.sort(key=lambda c: c[0])
        segments = []
        for i, (start, state) in enumerate(changes):
            stop = changes[i + 1][0] if i + 1 < len(changes) else self.end_step
            if state != "DORMANT":
                segments.append((start, max(stop, start), state))
        return segments

    def _marker(self, decision: DecisionReport, y: float) -> str:
        ts = decision.taken_at or decision.decided_at
        if ts is None:
            return ""
        x = self.x(self.clock.step_at(ts))
        title = f"{decision.action} ({decision.outcome}): {decision.reason or ''}"
        return _marker_shape(decision.action, x, y, title)

    def timeline(self) -> str:
        r = self.report
        seeds = sorted(r.seeds, key=lambda s: (s.layer, s.seed))
        if not seeds:
            return self._empty("seed-timeline", 100, "no seed was germinated in this job")
        lane, top = 28, 34
        bottom = top + lane * len(seeds)
        height = bottom + 62
        parts = [self._x_axis(top - 6, bottom)]
        lanes = {(s.layer, s.seed): top + i * lane for i, s in enumerate(seeds)}
        for seed in seeds:
            y0 = lanes[(seed.layer, seed.seed)]
            name = escape(f"{seed.layer} · seed {seed.seed}")
            parts.append(
                f'<text class="lane-label" x="{PLOT_LEFT - 8}" y="{y0 + 19}" font-size="12" '
                f'text-anchor="end" fill="#333">{name}</text>'
                f'<rect x="{PLOT_LEFT}" y="{y0 + 4}" width="{WIDTH - PLOT_LEFT - PLOT_RIGHT}" '
                f'height="{lane - 8}" fill="#fafafa"/>'
            )
            for start, stop, state in self._segments(seed):
                x0, x1 = self.x(start), self.x(stop)
                parts.append(
                    f'<rect class="segment state-{escape(state)}" x="{x0:.1f}" y="{y0 + 4}" '
                    f'width="{max(x1 - x0, 3):.1f}" height="{lane - 8}" '
                    f'fill="{STATE_COLORS.get(state, "#999")}"><title>{escape(state)} from step '
                    f"{_fmt(start)} to {_fmt(stop)}</title></rect>"
                )
        for decision in r.decisions:
            at = lanes.get((decision.layer, decision.seed)) if decision.seed is not None else None
            if at is not None and decision.outcome == "applied":
                parts.append(self._marker(decision, at + lane / 2))
        legend = [(s, c) for s, c in STATE_COLORS.items() if s != "DORMANT"]
        parts.append(self._legend(legend, 18))
        x = float(PLOT_LEFT)
        for action in get_args(Action):
            label = f"{action} decision"
            parts.append(
                _marker_shape(action, x + 7, bottom + 44, label)
                + f'<text x="{x + 18:.0f}" y="{bottom + 48}" font-size="12" fill="#333">'
                f"{escape(label)}</text>"
            )
            x += 40 + 7.0 * len(label)
        return (
            f'<svg id="seed-timeline" class="chart" width="{WIDTH}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
        )

    # ----------------------------------------------------------------- tables
    def summary(self) -> str:
        r = self.report
        active = sum(1 for seed in r.seeds if seed.state == "ACTIVE")
        stats = [
            ("epochs", _fmt(r.epochs_completed)),
            ("steps", _fmt(r.step)),
            ("train loss", _fmt(r.train_loss)),
            ("val loss", _fmt(r.val_loss)),
            ("val accuracy", _fmt(r.val_accuracy)),
            ("samples/s", _fmt(r.samples_per_s)),
            ("active seeds", f"{active} of {len(r.seeds)}"),
            ("params added", _fmt(r.parameters_added)),
        ]
        boxes = "".join(
            f'<div class="stat"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div>'
            "</div>"
            for k, v in stats
        )
        when = f"first seen {_when(r.first_seen)}"
        if r.finished_at is not None:
            when += f", finished {_when(r.finished_at)}"
        error = f'<p class="error">{escape(r.error)}</p>' if r.error else ""
        return f'<div class="stats">{boxes}</div><p class="note">{escape(when)}</p>{error}'

    def final_table(self) -> str:
        """Last epoch against best validation epoch, from the job's ending status; nothing
        before the job has ended (or when it measured nothing)."""
        final = self.report.final
        if final is None:
            return ""
        # Epochs counted from 1, as in the job's log and `esper jobs status`.
        done = self.report.epochs_completed
        last = f"last epoch ({done})" if done else "last epoch"
        best = "best epoch" + (f" ({final.best_epoch + 1})" if final.best_epoch is not None else "")
        head = f"<tr><th></th><th>{escape(last)}</th><th>{escape(best)}</th></tr>"
        pairs = [
            ("validation accuracy", final.val_accuracy, final.best_val_accuracy),
            ("test accuracy", final.test_accuracy, final.best_test_accuracy),
        ]
        rows = [
            f'<tr class="{escape(name.replace(" ", "-"))}"><th>{escape(name)}</th>'
            f"<td>{escape(_fmt(a))}</td><td>{escape(_fmt(b))}</td></tr>"
            for name, a, b in pairs
        ]
        # Measured at the end only: they describe the model as it was last.
        totals = [
            ("parameters", _count(final.parameters)),
            ("training FLOPs", _fmt(final.train_flops, 3)),
        ]
        rows += [
            f'<tr class="{escape(name.replace(" ", "-"))}"><th>{escape(name)}</th>'
            f'<td colspan="2">{escape(v)}</td></tr>'
            for name, v in totals
        ]
        note = '<p class="note">Epochs counted from 1; parameters and FLOPs as at the end.</p>'
        return (
            '<h2>Last epoch vs best epoch</h2><table id="final" class="final">'
            f"{head}{''.join(rows)}</table>{note}"
        )

    def seeds_table(self) -> str:
        if not self.report.seeds:
            return ""
        head = "<tr><th>slot</th><th>state</th><th>blueprint</th><th>kernel</th><th>params</th>"
        head += "<th>α</th><th>contribution</th><th>errors</th><th>transitions</th></tr>"
        rows = []
        for s in sorted(self.report.seeds, key=lambda s: (s.layer, s.seed)):
            path = " → ".join(t.to_state for t in s.transitions[-8:])
            values = [
                f"{s.layer} · {s.seed}",
                s.state,
                s.blueprint or "—",
                s.kernel_id or "—",
                _fmt(s.params),
                _fmt(s.alpha, 3),
                _fmt(s.contribution, 3),
                str(s.error_count),
                path or "—",
            ]
            rows.append("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in values) + "</tr>")
        return f'<h2>Seeds</h2><table class="seeds">{head}{"".join(rows)}</table>'

    def decisions_table(self) -> str:
        if not self.report.decisions:
            return ""
        head = "<tr><th>decided</th><th>action</th><th>layer · seed</th><th>what</th>"
        head += "<th>outcome</th><th>latency</th><th>reason</th></tr>"
        rows = []
        for d in self.report.decisions:
            slot = d.layer + (f" · {d.seed}" if d.seed is not None else "")
            latency = f"{d.latency_s * 1000:.0f} ms" if d.latency_s is not None else "—"
            values = [
                _when(d.decided_at),
                d.action,
                slot,
                d.blueprint or d.kernel or "",
                (d.outcome or "no answer yet") + (f": {d.outcome_reason}" if d.outcome else ""),
                latency,
                d.reason or "",
            ]
            rows.append("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in values) + "</tr>")
        return f'<h2>Decisions</h2><table class="decisions">{head}{"".join(rows)}</table>'


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 16px 24px;
       color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 15px; margin: 10px 0 2px; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff;
          font-size: 13px; vertical-align: middle; }
.SUCCEEDED { background: #2e7d32; } .FAILED { background: #b71c1c; }
.RUNNING { background: #0d47a1; } .STOPPED { background: #616161; }
.PENDING, .UNKNOWN { background: #9e9d24; }
.stats { display: flex; gap: 8px; flex-wrap: wrap; }
.stat { border: 1px solid #e3e3e3; border-radius: 6px; padding: 4px 10px; min-width: 90px; }
.stat .k { color: #666; font-size: 11px; } .stat .v { font-size: 16px; font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #eee; padding: 4px 10px; text-align: left; }
svg.chart { display: block; margin: 2px 0 4px; }
.note { color: #777; font-size: 12px; margin: 4px 0; } .error { color: #b71c1c; }
"""


def render(report: JobReport) -> str:
    page = Page(report)
    status = escape(report.status)
    dropped = ", ".join(f"{n} {k}" for k, n in sorted(report.dropped.items()))
    note = f'<p class="note">Left out to stay bounded: {escape(dropped)}.</p>' if dropped else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>Job {escape(report.job_id)} — Esper</title><style>{STYLE}</style></head><body>"
        f'<h1>Job {escape(report.job_id)} <span class="status {status}">{status}</span></h1>'
        f'<p class="note">As Nissa saw it on the bus ({escape(report.source)} report).</p>'
        f"{page.summary()}{page.final_table()}"
        f"<h2>Loss</h2>{page.loss_chart()}"
        f"<h2>Validation accuracy</h2>{page.accuracy_chart()}"
        f"<h2>Seed timeline</h2>{page.timeline()}"
        f"{page.seeds_table()}{page.decisions_table()}{note}"
        "</body></html>"
    )

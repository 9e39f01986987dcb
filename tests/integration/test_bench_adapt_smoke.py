"""The adaptation benchmark's harness end to end, small: `benchmarks/adaptation/run.py --quick`
(one task, one seed, 10 epochs) starts its own local stack, trains every arm through Tolaria's
API and writes the page, the plot and the raw results. What is checked is the harness — every
arm ran and was measured, the sizing rules hold, the page shows it — not whether growth paid,
which 10 epochs cannot say. About a minute on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "adaptation" / "run.py"
ALWAYS = ("static-initial", "adaptive", "static-same-size", "static-large")


def test_quick_benchmark_runs_every_arm_and_writes_the_page(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = done.stdout.strip().splitlines()[-1]
    assert "moons.static-initial=" in figures and "failed=0" in figures, figures
    assert "job 1/" in done.stderr and "moons adaptive seed 0" in done.stderr

    results = json.loads((tmp_path / "adaptation" / "results.json").read_text())
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(ALWAYS) <= set(runs), runs.keys()
    for arm, run in runs.items():
        assert run["status"] == "SUCCEEDED", run
        assert 0.0 <= run["accuracy"] <= 1.0, run
        assert len(run["val_curve"]) == 10, (arm, run["val_curve"])
        assert run["parameters"] > 0, run
    assert runs["static-large"]["parameters"] >= 4 * runs["static-initial"]["parameters"]
    assert runs["adaptive"]["germinations"] is not None
    # The same-size net is the widening nearest to the adaptive job's parameters: never
    # smaller than the initial net, and no farther from the target than the initial net is.
    target = runs["adaptive"]["parameters"]
    same = runs["static-same-size"]["parameters"]
    assert same >= runs["static-initial"]["parameters"]
    assert abs(same - target) <= abs(runs["static-initial"]["parameters"] - target)
    schedule = results["schedules"]["moons"]
    assert ("fixed-schedule" in runs) == bool(schedule)
    assert bool(schedule) == bool(runs["adaptive"]["germinations"])
    assert len(schedule) <= len(runs["adaptive"]["germinations"])

    page = (tmp_path / "adaptation.md").read_text()
    assert "| moons | static-large |" in page and "## How to run" in page
    assert "![moons](adaptation/moons.png)" in page
    assert (tmp_path / "adaptation" / "moons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The README's first command — the main job — run as written, from the repository root: it must
start the local stack, grow seeds in the demo job, and print a result that shows their effect."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "the README no longer starts with its commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_the_main_job_and_the_tests() -> None:
    assert readme_commands() == ["make demo", "make test"]


def test_the_main_command_grows_seeds_that_beat_the_control_job() -> None:
    command = readme_commands()[0]
    run = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = re.search(
        r"RESULT growth_val_acc=([\d.]+) control_val_acc=([\d.]+) gain=([+\-][\d.]+) seeds=(\d+)",
        run.stdout,
    )
    assert result is not None, run.stdout[-3000:]
    grown, control, gain, seeds = (float(g) for g in result.groups())
    assert seeds >= 1 and grown > control and gain >= 0.1, result.group(0)
    assert "decision germinate" in run.stdout and "LOADING → ACTIVE" in run.stdout

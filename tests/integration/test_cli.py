"""The `esper` command against a real local stack (Urza and Tolaria as processes, real Redis):
what a user types, run as a user runs it (the installed entry point, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esper.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
ESPER = str(Path(sys.executable).with_name("esper"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), services=["urza", "tolaria"]) as running:
        yield running


def esper(stack: LocalStack, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ESPER_TOLARIA_URL": stack.url("tolaria"),
        "ESPER_URZA_URL": stack.url("urza"),
        "ESPER_TAMIYO_URL": "http://127.0.0.1:9",  # not running: status must say so
        "ESPER_NISSA_URL": "http://127.0.0.1:9",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [ESPER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_submit_follow_then_inspect_a_job(stack: LocalStack, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: cli-job\nmodel: {kind: mlp, hidden: [16]}\n"
        "dataset: {kind: moons, samples: 400}\ntraining: {epochs: 3}\n"
    )
    run = esper(stack, "jobs", "submit", str(spec), "--follow")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.split("submitted: ")[1].split()[0]
    assert "epoch 3/3" in run.stdout and "SUCCEEDED" in run.stdout
    assert "job RUNNING" in run.stdout  # status events are shown as they happen

    listed = esper(stack, "jobs", "list")
    assert listed.returncode == 0 and job_id in listed.stdout and "cli-job" in listed.stdout
    status = esper(stack, "jobs", "status", job_id, "--json")
    assert status.returncode == 0 and '"status": "SUCCEEDED"' in status.stdout
    logs = esper(stack, "jobs", "logs", job_id, "--tail", "5")
    assert logs.returncode == 0 and "succeeded" in logs.stdout
    out = tmp_path / "ckpt.pt"
    saved = esper(stack, "jobs", "checkpoint", job_id, "-o", str(out))
    assert saved.returncode == 0
    assert torch.load(out, weights_only=True)["epoch"] == 3


def test_errors_are_one_readable_line(stack: LocalStack, tmp_path: Path) -> None:
    unknown = esper(stack, "jobs", "status", "job-nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().startswith("error: tolaria: 404 unknown_job")
    assert "Traceback" not in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: transformer}\ndataset: {kind: moons}\n")
    refused = esper(stack, "jobs", "submit", str(bad))
    assert refused.returncode == 1 and "422" in refused.stderr and "model" in refused.stderr
    assert "Traceback" not in refused.stderr

    missing = esper(stack, "jobs", "submit", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_kernels_blueprints_and_stack_status(stack: LocalStack) -> None:
    blueprints = esper(stack, "blueprints", "list")
    assert blueprints.returncode == 0
    assert all(name in blueprints.stdout for name in ("low_rank", "wide_mlp", "conv3x3"))
    kernels = esper(stack, "kernels", "list")
    assert kernels.returncode == 0 and "kernel" in kernels.stdout
    status = esper(stack, "stack", "status")
    assert status.returncode == 1  # tamiyo and nissa are not running here
    assert "tolaria" in status.stdout and "ready" in status.stdout
    assert "unreachable" in status.stdout

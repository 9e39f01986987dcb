"""A user's own script against a real local stack (`esper.session(..., controller="stack")`):
examples/own_loop.py — a Conv1d classifier that is in no zoo, on 1-D signals it generates, a
plain PyTorch loop — runs as a process of its own, as a user runs it. Its run is a job of the
stack: Tolaria lists it (and `esper jobs list`), Tamiyo answers its decision points and the
loop applies a germination, Nissa's `/metrics` carries its series and its HTML report renders,
and a stop asked through the API ends the loop. The same script with `controller="local"` and
no stack takes the same decisions at the same steps: the policy is one code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from esper.stack import SHORT_JOB_POLICY, LocalStack

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "own_loop.py"
ESPER = Path(sys.executable).parent / "esper"


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    return SHORT_JOB_POLICY


def client_env(stack: LocalStack | None) -> dict[str, str]:
    """The user's shell: the stack's addresses, or none at all (nothing to reach)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "TAMIYO_"))}
    env["OMP_NUM_THREADS"] = "1"
    if stack is not None:
        for service in ("tolaria", "tamiyo", "nissa", "urza"):
            if service in stack.services:
                env[f"ESPER_{service.upper()}_URL"] = stack.url(service)
    return env


def own_model_commands() -> list[str]:
    """The README's "Your own model" commands, as written (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's 'Your own model' lost its commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def run_command(stack: LocalStack | None, command: str) -> subprocess.CompletedProcess[str]:
    """A README command, as written, from the repository root, in the user's shell."""
    done = subprocess.run(
        command,
        shell=True,
        cwd=ROOT,
        env=client_env(stack),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_script(stack: LocalStack | None, command: str) -> dict[str, Any]:
    done = run_command(stack, command)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), done.stdout[-2000:]
    result: dict[str, Any] = json.loads(last.removeprefix("RESULT "))
    return result


def test_the_readme_runs_the_scripts_locally_and_on_the_stack_it_starts_for_short_jobs() -> None:
    assert own_model_commands() == [
        ".venv/bin/python examples/own_loop.py",
        ".venv/bin/esper up --short-jobs",
        ".venv/bin/python examples/own_loop.py --controller stack",
        ".venv/bin/python examples/own_loop_lightning.py --controller stack",
        ".venv/bin/esper jobs submit examples/python_job/spec.yaml --code examples/python_job "
        "--follow",
    ]
    # `esper up --short-jobs` is this module's stack: Tamiyo with SHORT_JOB_POLICY.
    shown = subprocess.run(
        [str(ESPER), "up", "--help"],
        env={**os.environ, "COLUMNS": "200"},  # one line per option: nothing wrapped
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--short-jobs" in shown.stdout and "SHORT_JOB_POLICY" in shown.stdout


def test_a_users_loop_is_a_job_of_the_stack_and_grows_as_the_local_policy_grows_it(
    full_stack: LocalStack,
) -> None:
    local_command, _, stack_command, *_ = own_model_commands()
    local = run_script(None, local_command)
    stacked = run_script(full_stack, stack_command)

    germinated = [d for d in stacked["decisions"] if d[2] == "germinate" and d[5] == "applied"]
    assert germinated, stacked
    assert stacked["decisions"] == local["decisions"]
    assert stacked["val_accuracy"] == local["val_accuracy"]

    job_id = stacked["job_id"]
    tolaria = httpx.Client(base_url=full_stack.url("tolaria"), timeout=30)
    view = tolaria.get(f"/jobs/{job_id}").json()
    assert view["status"] == "SUCCEEDED", view
    assert view["spec"]["model"]["kind"] == "external" and view["name"] == "own-loop"
    assert view["progress"]["epoch"] == 14 and view["progress"]["fraction"] == 1.0
    assert view["metrics"]["val_accuracy"] == pytest.approx(stacked["val_accuracy"])
    assert {s["layer"] for s in view["seeds"]} == {d[3] for d in germinated}
    listed = tolaria.get("/jobs").json()["items"]
    assert job_id in [j["job_id"] for j in listed]
    cli = subprocess.run(
        [str(ESPER), "jobs", "list"],
        env=client_env(full_stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert job_id in cli.stdout

    # The job's events, as for any job: epochs, the seed's transitions, the decisions, the end.
    events = tolaria.get(f"/jobs/{job_id}/events", timeout=30).text
    for kind in ("telemetry.report", "event.seed_transition", "event.decision_taken"):
        assert f"event: {kind}" in events
    assert '"status":"SUCCEEDED"' in events

    nissa = httpx.Client(base_url=full_stack.url("nissa"), timeout=30)
    report = _eventually(lambda: nissa.get(f"/reports/jobs/{job_id}").json(), "decisions")
    actions = [d["action"] for d in report["decisions"]]
    assert "germinate" in actions, report["decisions"]
    page = nissa.get(f"/reports/jobs/{job_id}.html")
    assert page.status_code == 200 and job_id in page.text


def test_the_lightning_callback_grows_a_trainers_module_with_the_stack_as_with_the_local_policy(
    full_stack: LocalStack,
) -> None:
    command = own_model_commands()[3]
    local = run_script(None, command.replace("--controller stack", "--controller local"))
    stacked = run_script(full_stack, command)
    assert any(d[2] == "germinate" and d[5] == "applied" for d in stacked["decisions"]), stacked
    assert stacked["decisions"] == local["decisions"]
    assert stacked["val_accuracy"] == local["val_accuracy"]
    tolaria = httpx.Client(base_url=full_stack.url("tolaria"), timeout=30)
    view = tolaria.get(f"/jobs/{stacked['job_id']}").json()
    assert view["status"] == "SUCCEEDED" and view["progress"]["epoch"] == 14, view
    assert view["seeds"], view


def test_your_code_as_a_tolaria_job_trains_and_grows(full_stack: LocalStack) -> None:
    done = run_command(full_stack, own_model_commands()[4])
    job_id = re.search(r"submitted: (job-[0-9a-f]+)", done.stdout)
    assert job_id is not None, done.stdout[-2000:]
    tolaria = httpx.Client(base_url=full_stack.url("tolaria"), timeout=30)
    view = tolaria.get(f"/jobs/{job_id.group(1)}").json()
    assert view["status"] == "SUCCEEDED", view
    assert view["spec"]["model"]["kind"] == "python" and view["spec"]["code"]["digest"]
    # It grew: --follow shows Tamiyo's germination applied and the seed going ACTIVE.
    assert "decision germinate" in done.stdout and "LOADING → ACTIVE" in done.stdout, done.stdout


def test_a_stop_asked_through_the_api_ends_the_users_loop(full_stack: LocalStack) -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--controller", "stack", "--epochs", "500"],
        env=client_env(full_stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("JOB "), first
        job_id = first.split()[1]
        # While it runs, Nissa exports its series.
        nissa = httpx.Client(base_url=full_stack.url("nissa"), timeout=30)
        series = f'esper_job_epoch{{job_id="{job_id}"}}'
        _eventually(lambda: series in nissa.get("/metrics").text, None)
        tolaria = httpx.Client(base_url=full_stack.url("tolaria"), timeout=30)
        assert tolaria.get(f"/jobs/{job_id}").json()["status"] == "RUNNING"
        tolaria.post(f"/jobs/{job_id}/stop").raise_for_status()
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-3000:]
    assert "stop requested: leaving the loop" in out
    view = tolaria.get(f"/jobs/{job_id}").json()
    assert view["status"] == "STOPPED" and view["error"] == "stopped on request", view
    assert 0 < view["progress"]["epoch"] < 500


def _eventually(probe: Any, key: str | None, timeout_s: float = 30) -> Any:
    """`probe()` once it is truthy (or its `key` is non-empty)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if (value[key] if key is not None else value) or time.monotonic() > deadline:
            assert value[key] if key is not None else value, value
            return value
        time.sleep(0.2)

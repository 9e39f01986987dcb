"""`esper up` as a supervisor, run as a person runs it (the installed entry point, in a
subprocess): a signal stops every process it started, a SIGKILL does not leave them orphaned, a
process that dies is restarted while the others run on, and TOLARIA_DATA_DIR is honoured.

Child processes are found through /proc (each one's parent pid), so these tests need Linux."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from esper.processes import ping
from esper.testing.esper_up import (
    ESPER,
    GONE_S,
    children_of,
    esper_up,
    gone,
    port_free,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the death signal is Linux's"
)


def test_sigterm_stops_every_child_and_frees_the_ports(tmp_path: Path) -> None:
    with esper_up(tmp_path, services="urza,tolaria,tamiyo,nissa") as up:
        assert "routes are open (no tokens)" in up.output()
        assert "127.0.0.1 (loopback) only" in up.output()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0, up.output()
        assert "SIGTERM: stopping" in up.output() and "stopped" in up.output()
        wait_until(lambda: all(gone(pid) for pid in up.children), 5, "every child gone")
        assert all(port_free(port) for port in up.ports.values()), up.ports


def test_sigterm_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    args = [ESPER, "up", "--free-ports", "--root", str(tmp_path / "stack"), "--services", "urza"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, str] = {}
    try:
        wait_until(lambda: bool(seen.update(children_of(proc.pid)) or seen), 60, "a child")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert b"SIGTERM: stop" in out  # while starting, or just after: both are orderly
        wait_until(lambda: all(gone(pid) for pid in seen), 5, "every child gone")
    finally:
        proc.kill()
        proc.wait()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sighup_stops_the_stack_too(tmp_path: Path) -> None:
    with esper_up(tmp_path, services="urza") as up:
        up.proc.send_signal(signal.SIGHUP)
        assert up.proc.wait(60) == 0, up.output()
        assert "SIGHUP: stopping" in up.output()
        wait_until(lambda: all(gone(pid) for pid in up.children), 5, "every child gone")


def test_sigkill_takes_the_children_with_it(tmp_path: Path) -> None:
    with esper_up(tmp_path) as up:
        up.proc.kill()  # no handler runs: only the kernel's parent-death signal can help
        up.proc.wait(10)
        wait_until(lambda: all(gone(pid) for pid in up.children), GONE_S, "every child gone")
        wait_until(lambda: all(map(port_free, up.ports.values())), 5, "every port free")


def test_a_dead_service_is_restarted_while_the_rest_run_on(tmp_path: Path) -> None:
    with esper_up(tmp_path) as up:
        tolaria = up.pid_of("tolaria")
        os.kill(tolaria, signal.SIGKILL)
        wait_until(lambda: gone(tolaria), 5, "tolaria killed")
        wait_until(lambda: "tolaria exited (SIGKILL)" in up.output(), 10, "the exit reported")
        assert up.proc.poll() is None, up.output()  # the stack was not torn down
        assert ping(up.ports["redis"])
        assert up.healthy("urza")
        wait_until(lambda: up.healthy("tolaria"), 60, "tolaria back after its restart")
        assert up.pid_of("tolaria") != tolaria
        assert "restart 1 in" in up.output()
        # Reported once its start() returns, which is a moment after /healthz first answers.
        wait_until(lambda: "tolaria restarted (restart 1" in up.output(), 10, "restart reported")
        assert up.pid_of("redis") in up.children and up.pid_of("urza") in up.children


def test_tolaria_data_dir_is_honoured(tmp_path: Path) -> None:
    data = tmp_path / "my-data"
    data.mkdir()
    rows = [f"{i % 7 / 7:.3f},{i % 3 / 3:.3f},{i % 2}" for i in range(60)]
    (data / "tiny.csv").write_text("\n".join(rows) + "\n")
    env = {
        "TOLARIA_DATA_DIR": str(data),
        "TOLARIA_WORKERS": "0",  # the job is only validated and queued, never trained
        "TOLARIA_HOST": "0.0.0.0",  # a shell's setting the local stack must not follow
    }
    with esper_up(tmp_path, env=env) as up:
        job = {
            "name": "file-data",
            "model": {"kind": "mlp", "hidden": [4]},
            "dataset": {"kind": "csv", "path": "tiny.csv"},
            "training": {"epochs": 1},
        }
        url = f"http://127.0.0.1:{up.ports['tolaria']}/jobs"
        accepted = httpx.post(url, json=job, timeout=30)
        assert accepted.status_code == 202, accepted.text  # the file is only in TOLARIA_DATA_DIR
        assert not (tmp_path / "stack" / "data").exists()
        missing = httpx.post(url, json={**job, "dataset": {"kind": "csv", "path": "no.csv"}})
        assert missing.status_code == 422, missing.text
        log = up.output()
        assert f"data in {data}" in log
        assert f"Uvicorn running on http://127.0.0.1:{up.ports['tolaria']}" in log

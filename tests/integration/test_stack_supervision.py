"""`esper up` as a supervisor, run as a person runs it (the installed entry point, in a
subprocess): a signal stops every process it started, a SIGKILL does not leave them orphaned, a
process that dies is restarted while the others run on, and TOLARIA_DATA_DIR is honoured.

Child processes are found through /proc (each one's parent pid), so these tests need Linux."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from esper.processes import ping

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the death signal is Linux's"
)

ESPER = str(Path(sys.executable).with_name("esper"))
STARTUP_S = 120.0  # a loaded 2-core machine; typically ~10 s
GONE_S = 20.0  # children run their shutdown code (SIGTERM), typically ~2 s
URL = re.compile(r"(redis|urza|tolaria|tamiyo|nissa)\s*│\s*(redis|http)://127\.0\.0\.1:(\d+)")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, …)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children_of(pid: int) -> dict[int, str]:
    """Live children of `pid` → their command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] == "Z" or int(fields[1]) != pid:
            continue
        with contextlib.suppress(OSError):
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper that is not ours counts as exited)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def port_free(port: int) -> bool:
    """Nothing listens on it: a new server could bind it (as uvicorn and Redis would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    out: Path
    ports: dict[str, int]
    children: dict[int, str]

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def pid_of(self, name: str) -> int:
        pattern = "redis-server" if name == "redis" else f"-m {name}"
        (pid,) = [p for p, cmd in children_of(self.proc.pid).items() if pattern in cmd]
        return pid

    def healthy(self, name: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            url = f"http://127.0.0.1:{self.ports[name]}/healthz"
            return httpx.get(url, timeout=2.0).status_code == 200
        return False


@contextlib.contextmanager
def esper_up(
    tmp_path: Path, services: str = "urza,tolaria", env: Mapping[str, str] | None = None
) -> Iterator[Up]:
    """`esper up --free-ports` in a subprocess, ready; whatever it started is killed at the
    end whatever the test did, so a failing test leaves nothing behind."""
    out = tmp_path / "up.out"
    full_env = {
        **os.environ,
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "URZA_LOG_JSON": "false",
        "TOLARIA_LOG_JSON": "false",
        "TAMIYO_LOG_JSON": "false",
        "NISSA_LOG_JSON": "false",
        **(env or {}),
    }
    args = [ESPER, "up", "--free-ports", "--root", str(tmp_path / "stack"), "--services", services]
    with open(out, "wb") as sink:  # a file, not a pipe: the streamed logs never block it
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=full_env)
    seen: dict[int, str] = {}
    try:

        def ready() -> bool:
            seen.update(children_of(proc.pid))
            if proc.poll() is not None:
                raise AssertionError(f"esper up exited {proc.returncode}:\n{out.read_text()}")
            return "streaming logs" in out.read_text(errors="replace")

        wait_for(ready, STARTUP_S, "esper up ready")
        text = out.read_text(errors="replace")
        ports = {m.group(1): int(m.group(3)) for m in URL.finditer(text)}
        assert set(ports) == {"redis", *services.split(",")}, text
        up = Up(proc, out, ports, children_of(proc.pid))
        assert len(up.children) == len(ports), up.children
        yield up
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in {*seen, *children_of(proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_every_child_and_frees_the_ports(tmp_path: Path) -> None:
    with esper_up(tmp_path, services="urza,tolaria,tamiyo,nissa") as up:
        assert "routes are open (no tokens)" in up.output()
        assert "127.0.0.1 (loopback) only" in up.output()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0, up.output()
        assert "SIGTERM: stopping" in up.output() and "stopped" in up.output()
        wait_for(lambda: all(gone(pid) for pid in up.children), 5, "every child gone")
        assert all(port_free(port) for port in up.ports.values()), up.ports


def test_sigterm_while_starting_stops_what_was_started(tmp_path: Path) -> None:
    args = [ESPER, "up", "--free-ports", "--root", str(tmp_path / "stack"), "--services", "urza"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, str] = {}
    try:
        wait_for(lambda: bool(seen.update(children_of(proc.pid)) or seen), 60, "a child")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert b"SIGTERM: stop" in out  # while starting, or just after: both are orderly
        wait_for(lambda: all(gone(pid) for pid in seen), 5, "every child gone")
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
        wait_for(lambda: all(gone(pid) for pid in up.children), 5, "every child gone")


def test_sigkill_takes_the_children_with_it(tmp_path: Path) -> None:
    with esper_up(tmp_path) as up:
        up.proc.kill()  # no handler runs: only the kernel's parent-death signal can help
        up.proc.wait(10)
        wait_for(lambda: all(gone(pid) for pid in up.children), GONE_S, "every child gone")
        wait_for(lambda: all(map(port_free, up.ports.values())), 5, "every port free")


def test_a_dead_service_is_restarted_while_the_rest_run_on(tmp_path: Path) -> None:
    with esper_up(tmp_path) as up:
        tolaria = up.pid_of("tolaria")
        os.kill(tolaria, signal.SIGKILL)
        wait_for(lambda: gone(tolaria), 5, "tolaria killed")
        wait_for(lambda: "tolaria exited (SIGKILL)" in up.output(), 10, "the exit reported")
        assert up.proc.poll() is None, up.output()  # the stack was not torn down
        assert ping(up.ports["redis"])
        assert up.healthy("urza")
        wait_for(lambda: up.healthy("tolaria"), 60, "tolaria back after its restart")
        assert up.pid_of("tolaria") != tolaria
        assert "restart 1 in" in up.output()
        # Reported once its start() returns, which is a moment after /healthz first answers.
        wait_for(lambda: "tolaria restarted (restart 1" in up.output(), 10, "restart reported")
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

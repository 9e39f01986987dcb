"""`esper up` run as a person runs it (the installed entry point, in a subprocess) and the
processes it started, found through /proc (each one's parent pid): for the tests that signal,
kill or restart the local stack's processes. Linux only."""

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

ESPER = str(Path(sys.executable).with_name("esper"))
STARTUP_S = 120.0  # a loaded 2-core machine; typically ~10 s
GONE_S = 20.0  # children run their shutdown code (SIGTERM), typically ~2 s
URL = re.compile(r"(redis|urza|tolaria|tamiyo|nissa)\s*│\s*(redis|http)://127\.0\.0\.1:(\d+)")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
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

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

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

        wait_until(ready, STARTUP_S, "esper up ready")
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

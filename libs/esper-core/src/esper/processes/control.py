"""A child process owned by an object (ChildProcess), ending it the two ways the local stack and
the tests need, and a free port."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

_DEATHSIG = Path(__file__).with_name("_deathsig.py")


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (the process runs its shutdown code); SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL: a crash, with no shutdown code run."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def with_death_signal(args: Sequence[str], death_signal: int | None) -> list[str]:
    """`args` run so that the kernel sends `death_signal` to the process when the *thread* that
    spawns it exits (Linux's PR_SET_PDEATHSIG; unchanged elsewhere, or when `death_signal` is
    None). A process killed with SIGKILL runs no cleanup, so this is the only way its children
    do not outlive it holding their ports.

    The kernel ties the signal to the spawning thread, not the process: spawn from a thread that
    lives as long as the children should (the main thread), never from a short-lived helper."""
    if death_signal is None or not sys.platform.startswith("linux"):
        return list(args)
    return [
        sys.executable,
        "-I",  # neither the user's site-packages nor PYTHON* variables: it only execs
        "-S",
        str(_DEATHSIG),
        str(int(death_signal)),
        str(os.getpid()),
        *args,
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_LIVE: weakref.WeakSet[ChildProcess] = weakref.WeakSet()


class ChildProcess:
    """What RedisServer and ServiceProcess share: one process owned by the object, a log file,
    `stop()` (graceful) and `kill()` (a crash), and a context manager. Processes still running
    at interpreter exit are killed, so a failed test run leaves no server holding a port."""

    log_path: Path
    stop_timeout_s: float = 10.0
    death_signal: int | None = None
    """Sent by the kernel to the process when the thread that started it exits (Linux; see
    `with_death_signal`). Off by default: a test helper that starts a process from a worker
    thread would otherwise see it die with that thread."""
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (negative: the signal that ended it);
        None while it runs or after `stop()`/`kill()` forgot it."""
        return self._proc.poll() if self._proc is not None else None

    def _popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            with_death_signal(args, self.death_signal), **kwargs
        )
        return proc

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        _LIVE.add(self)

    def log_tail(self, lines: int = 30, sep: str = "\n") -> str:
        try:
            return sep.join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (the process runs its shutdown code); SIGKILL if it has not exited after
        `timeout_s` (default: the class's `stop_timeout_s`)."""
        if self._proc is not None:
            terminate(self._proc, self.stop_timeout_s if timeout_s is None else timeout_s)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, with no shutdown code run."""
        if self._proc is not None:
            kill(self._proc)
        self._proc = None

    def close(self) -> None:
        """Stop the process and forget it."""
        self.stop()
        _LIVE.discard(self)

    def start(self) -> Self:
        raise NotImplementedError

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) and start again with the same port and files."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for child in list(_LIVE):
        with contextlib.suppress(Exception):
            child.kill()

"""Ending a child process the two ways the local stack and the tests need, and a free port."""

from __future__ import annotations

import signal
import socket
import subprocess


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

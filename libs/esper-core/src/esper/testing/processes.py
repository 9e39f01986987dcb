"""Ending a child process the two ways the test servers need: gracefully, or as a crash."""

from __future__ import annotations

import signal
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

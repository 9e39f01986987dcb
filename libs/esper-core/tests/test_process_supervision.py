"""What `esper up` is built from, on real processes: the supervisor that restarts a child that
died (with backoff, giving up after too many), the parent-death signal, and the signals that
stop the stack. `esper up` itself runs in tests/integration/test_stack_supervision.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper._backoff import Backoff
from esper.cli.stack import StopSignal, stop_signals
from esper.processes import ServiceProcess
from esper.processes.control import ChildProcess, with_death_signal
from esper.processes.supervisor import (
    ChildExited,
    ChildRestarted,
    Supervisor,
    SupervisorEvent,
    describe_exit,
)

LINUX = sys.platform.startswith("linux")


class Script(ChildProcess):
    """A Python snippet as a supervised child: the smallest real process with a log."""

    stop_timeout_s = 2.0

    def __init__(self, code: str, log_dir: Path) -> None:
        self.code = code
        self.log_path = log_dir / f"script-{id(self)}.log"

    def start(self) -> Script:
        with open(self.log_path, "ab") as log:
            self._adopt(self._popen([sys.executable, "-c", self.code], stdout=log, stderr=log))
        return self

    def restart(self, *, kill: bool = False) -> Script:
        self.kill() if kill else self.stop()
        return self.start()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Script]:
    with Script("import time; time.sleep(60)", tmp_path) as child:
        yield child


def wait_exit(child: ChildProcess, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while child.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not child.running


def test_a_child_that_keeps_dying_is_restarted_then_given_up_the_rest_run_on(
    tmp_path: Path, sleeper: Script
) -> None:
    crasher = Script("print('boom', flush=True); raise SystemExit(3)", tmp_path).start()
    supervisor = Supervisor(
        {"crasher": crasher, "sleeper": sleeper},
        backoff=Backoff(0.01, 0.05),
        max_restarts=2,
        window_s=300,
    )
    steady = sleeper.pid
    events: list[SupervisorEvent] = []
    deadline = time.monotonic() + 30
    while supervisor.given_up() != ["crasher"] and time.monotonic() < deadline:
        events += supervisor.poll()
        time.sleep(0.01)
    exits = [e for e in events if isinstance(e, ChildExited)]
    restarts = [e for e in events if isinstance(e, ChildRestarted)]
    assert [e.name for e in events] == ["crasher"] * 5
    assert [e.restart for e in exits] == [1, 2, None] and exits[-1].gave_up
    assert [e.restart for e in restarts] == [1, 2]
    assert all(e.returncode == 3 and "boom" in e.log_tail and e.error is None for e in exits)
    assert all(0 <= e.delay_s <= 0.05 for e in exits[:2])
    assert sleeper.running and sleeper.pid == steady  # never touched
    assert supervisor.poll() == []  # given up: no more reports, no more restarts
    crasher.close()


def test_restarts_older_than_the_window_do_not_count(tmp_path: Path) -> None:
    clock = Clock()
    crasher = Script("raise SystemExit(1)", tmp_path).start()
    wait_exit(crasher)
    supervisor = Supervisor(
        {"crasher": crasher},
        backoff=Backoff(1, 1, floor_s=1),
        max_restarts=1,
        window_s=10,
        clock=clock,
    )
    (first,) = supervisor.poll()
    assert isinstance(first, ChildExited) and first.restart == 1 and first.delay_s == 1
    assert supervisor.poll() == []  # not due yet
    clock.now = 1.0
    (restarted,) = supervisor.poll()
    assert isinstance(restarted, ChildRestarted) and restarted.restart == 1
    wait_exit(crasher)
    clock.now = 11.5  # the first restart has left the window
    (again,) = supervisor.poll()
    assert isinstance(again, ChildExited) and again.restart == 1 and not again.gave_up
    crasher.close()


def test_a_restart_that_fails_to_start_is_reported_with_its_error_and_retried(
    tmp_path: Path,
) -> None:
    broken = ServiceProcess("esper_no_such_service", port_env="X_PORT", log_dir=tmp_path)
    supervisor = Supervisor({"broken": broken}, backoff=Backoff(0.01, 0.01), max_restarts=3)
    (noticed,) = supervisor.poll()
    assert isinstance(noticed, ChildExited) and noticed.restart == 1
    time.sleep(0.02)
    (failed,) = supervisor.poll()
    assert isinstance(failed, ChildExited) and failed.restart == 2
    assert failed.error is not None and "exited with 1 while starting" in failed.error
    assert failed.returncode == 1 and "esper_no_such_service" in failed.log_tail
    broken.close()


def test_bad_limits_are_refused(sleeper: Script) -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor({"s": sleeper}, max_restarts=-1)
    with pytest.raises(ValueError, match="window_s"):
        Supervisor({"s": sleeper}, window_s=0)


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(3) == "exit 3"
    assert describe_exit(-signal.SIGKILL) == "SIGKILL"
    assert describe_exit(None) == "exit status unknown"


PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from esper.processes.control import with_death_signal
    signum = int(sys.argv[1]) or None
    child = subprocess.Popen(
        with_death_signal([sys.executable, "-c", "import time; time.sleep(60)"], signum)
    )
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


def _orphan_after_parent_killed(death_signal: int) -> tuple[int, bool]:
    """Start PARENT, SIGKILL it, and say whether its child is gone within 10 s."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(death_signal)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return child, True
        if state == "Z":  # exited; its reaper is not us
            return child, True
        if not death_signal:
            break  # the control case: once is enough to see it outlive its parent
        time.sleep(0.05)
    return child, False


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_even_when_the_parent_is_sigkilled() -> None:
    child, gone = _orphan_after_parent_killed(int(signal.SIGTERM))
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_without_the_death_signal_the_child_outlives_its_parent() -> None:
    child, gone = _orphan_after_parent_killed(0)
    try:
        assert not gone
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
def test_the_wrapper_does_not_run_the_command_once_its_parent_is_gone() -> None:
    # A parent pid that is not ours: as if our parent had died between fork and prctl.
    args = with_death_signal(["echo", "ran"], signal.SIGTERM)
    args[args.index(str(os.getpid()))] = "1"
    run = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "ran" not in run.stdout


def test_without_a_death_signal_the_command_is_unchanged() -> None:
    assert with_death_signal(["redis-server", "--port", "1"], None) == [
        "redis-server",
        "--port",
        "1",
    ]


def test_sigterm_and_sighup_take_ctrl_c_s_path_and_an_ignored_one_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as raised, stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert isinstance(raised.value, StopSignal) and str(raised.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop_signals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, previous)

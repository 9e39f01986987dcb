"""Restarting the local stack's processes when they die, one at a time.

A child that exits on its own is not a reason to stop the others: it is started again after a
backoff (exponential, with jitter), on the same port and with the same files, so the URL every
other service holds stays right. A child that keeps dying is given up after `max_restarts`
restarts within `window_s`, and the rest run on. `poll()` never sleeps: its caller (the loop of
`esper up`) calls it between other work and reports what it returns.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from esper._backoff import Backoff
from esper.processes.control import ChildProcess


def describe_exit(returncode: int | None) -> str:
    """`exit 3`, `SIGKILL`, or `exit status unknown`."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


@dataclass(frozen=True)
class ChildExited:
    """`name` exited. `restart` is the number (within the window) of the restart that follows
    in `delay_s`; None when the supervisor has given it up. `error` is set when it was a restart
    that failed to come up."""

    name: str
    returncode: int | None
    log_tail: str
    restart: int | None
    delay_s: float
    error: str | None = None

    @property
    def gave_up(self) -> bool:
        return self.restart is None


@dataclass(frozen=True)
class ChildRestarted:
    name: str
    restart: int
    pid: int | None


SupervisorEvent = ChildExited | ChildRestarted


@dataclass
class _State:
    restarts: list[float] = field(default_factory=list)
    """When each restart within the window happened (monotonic seconds)."""
    restart_at: float | None = None
    gave_up: bool = False


class Supervisor:
    """Watches `children` (name → process, in the order to check them).

    Restarts run in the caller's thread and block until the child is ready again (a service's
    `start()` waits for its health route). With a death signal set on the children, that thread
    must be the one that started them and must outlive them (see `with_death_signal`)."""

    def __init__(
        self,
        children: Mapping[str, ChildProcess],
        *,
        backoff: Backoff | None = None,
        max_restarts: int = 5,
        window_s: float = 300.0,
        tail_lines: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_restarts < 0 or window_s <= 0:
            raise ValueError(
                f"need max_restarts >= 0 and window_s > 0, got {max_restarts}, {window_s}"
            )
        self.children = dict(children)
        self.backoff = backoff or Backoff(1.0, 30.0, floor_s=0.5)
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.tail_lines = tail_lines
        self.clock = clock
        self._states = {name: _State() for name in self.children}

    def given_up(self) -> list[str]:
        return [name for name, state in self._states.items() if state.gave_up]

    def poll(self) -> list[SupervisorEvent]:
        """Notice exits and run the restarts that are due."""
        events: list[SupervisorEvent] = []
        for name, child in self.children.items():
            state = self._states[name]
            if state.gave_up:
                continue
            if state.restart_at is None:
                if not child.running:
                    events.append(self._schedule(name, child, state))
            elif self.clock() >= state.restart_at:
                events.append(self._restart(name, child, state))
        return events

    def _schedule(
        self, name: str, child: ChildProcess, state: _State, error: str | None = None
    ) -> ChildExited:
        now = self.clock()
        state.restarts = [t for t in state.restarts if now - t < self.window_s]
        code, tail = child.returncode, child.log_tail(self.tail_lines)
        if len(state.restarts) >= self.max_restarts:
            state.gave_up = True
            return ChildExited(name, code, tail, None, 0.0, error)
        delay = self.backoff.delay(len(state.restarts))
        state.restart_at = now + delay
        return ChildExited(name, code, tail, len(state.restarts) + 1, delay, error)

    def _restart(self, name: str, child: ChildProcess, state: _State) -> SupervisorEvent:
        state.restart_at = None
        state.restarts.append(self.clock())
        try:
            child.restart()
        except Exception as err:  # a start that fails is one more exit, with its reason
            return self._schedule(name, child, state, error=str(err))
        return ChildRestarted(name, len(state.restarts), child.pid)

"""Background work done every few seconds: heartbeats, polls, housekeeping, flushes.

Each such loop has to survive a failed round (Redis away, a bug in one step) and still end at
once when its service or job shuts down; `run_every` is that loop, written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from esper.bus.connection import CONNECTION_ERRORS
from esper.exceptions import BusError

log = logging.getLogger("esper.service.loops")
OUTAGES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, BusError)
"""What a round may fail with while a server is away: logged without a traceback."""

Step = Callable[[], Awaitable[object]]


async def run_every(
    interval_s: float,
    fn: Step,
    *,
    name: str,
    stop: asyncio.Event | None = None,
    wait_first: bool = False,
    logger: logging.Logger | None = None,
) -> None:
    """Await `fn()` every `interval_s` seconds (the pause is taken after each round) until
    `stop` is set or the task is cancelled. `wait_first` pauses before the first round too.

    A round that raises is logged and the next one runs on time: a lost connection as a warning,
    anything else with its traceback, since that is a bug to fix rather than an outage to wait out.
    """
    out = logger or log
    if wait_first and await _wait(stop, interval_s):
        return
    while stop is None or not stop.is_set():
        try:
            await fn()
        except OUTAGES as err:
            out.warning("%s failed: %s: %s", name, type(err).__name__, err)
        except Exception:
            out.exception("%s failed", name)
        if await _wait(stop, interval_s):
            return


async def _wait(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, or less when `stop` is set meanwhile; whether it was."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class Periodic:
    """`run_every` on a task of its own: `start()` it in a lifespan, `await stop()` on the way out.
    Stopping cancels the round in progress, so a round stuck on a dead server never holds up a
    shutdown."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        fn: Step,
        *,
        wait_first: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self.wait_first = wait_first
        self.logger = logger
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> Periodic:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(
            run_every(
                self.interval_s,
                self.fn,
                name=self.name,
                wait_first=self.wait_first,
                logger=self.logger,
            ),
            name=self.name,
        )
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

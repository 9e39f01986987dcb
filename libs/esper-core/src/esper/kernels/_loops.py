"""One async client per running event loop, closed when that loop shuts down."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Clients keyed by the event loop they run on.

    redis.asyncio and httpx clients keep connections bound to the loop that opened them, and
    KernelCache.get_sync may run a fetch on a short-lived loop in a worker thread, so each loop
    gets its own client. A parked async generator owns each client and closes it in `finally`:
    asyncio.run and asyncio.Runner finalize every live async generator before closing their loop,
    so a worker loop's connections are closed with it instead of leaking until garbage collection.
    """

    def __init__(self, make: Callable[[], T], close: Callable[[T], Awaitable[None]]) -> None:
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._entries: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[T, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.get(loop)
            if entry is not None:
                return entry[0]
            # A loop closed without finalizing its generators still holds its entry (the client
            # references the loop, so the weak key never dies): drop those here.
            for dead in [other for other in self._entries if other.is_closed()]:
                del self._entries[dead]
        client = self._make()
        owner = self._own(loop, client)
        # The first step registers the generator with the running loop and does not suspend, so
        # no other coroutine of this loop can have stored a client in the meantime.
        await owner.__anext__()
        with self._lock:
            self._entries[loop] = (client, owner)
        return client

    async def _own(self, loop: asyncio.AbstractEventLoop, client: T) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with self._lock:
                entry = self._entries.get(loop)
                if entry is not None and entry[0] is client:
                    del self._entries[loop]
            await self._close(client)

    async def aclose(self) -> None:
        """Close this loop's client now. Other loops' clients are dropped: each is closed on its
        own loop when that loop finalizes the generator owning it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.pop(loop, None)
            self._entries.clear()
        if entry is not None:
            await entry[1].aclose()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

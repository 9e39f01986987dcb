"""Kernel sizes for "parameters added": from `kernel.ready` events, else asked of Urza.

Urza announces a kernel once, when it is first stored; a job that reuses it later (the same
blueprint for the same host is the same kernel), or a kernel announced before Nissa started, is
looked up with `GET /kernels/{id}` — over HTTP, as services talk, never by importing Urza.
A lookup that fails is tried again after `RETRY_S`; until then that job's parameters read as
unknown, not as zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from nissa.state import NissaState

log = logging.getLogger("nissa.kernels")
RETRY_S = 30.0
POLL_S = 0.5


class KernelLookup:
    def __init__(self, state: NissaState, urza_url: str, token: str | None) -> None:
        self.state = state
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=urza_url, headers=headers, timeout=5.0)
        self.failed: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nissa-kernels")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = [
                k
                for k in list(self.state.wanted_kernels)
                if now - self.failed.get(k, -RETRY_S) >= RETRY_S
            ]
            for kernel_id in due[:16]:
                await self.lookup(kernel_id)
            await asyncio.sleep(POLL_S)

    async def lookup(self, kernel_id: str) -> None:
        try:
            response = await self.client.get(f"/kernels/{kernel_id}")
            if response.status_code == 200:
                meta = response.json()
                params = meta.get("params")
                blueprint = meta.get("blueprint")
                if isinstance(params, int) and not isinstance(params, bool) and params >= 0:
                    self.state.remember_kernel(
                        kernel_id, blueprint if isinstance(blueprint, str) else None, params
                    )
                    self.failed.pop(kernel_id, None)
                    return
            log.info("kernel %s not found in Urza (HTTP %d)", kernel_id, response.status_code)
        except (httpx.HTTPError, ValueError) as err:
            log.warning("kernel %s not looked up: %s: %s", kernel_id, type(err).__name__, err)
        self.failed[kernel_id] = time.monotonic()
        while len(self.failed) > 1000:
            self.failed.pop(next(iter(self.failed)))

"""Kernel sizes for "parameters added": from `kernel.ready` events, else asked of Urza.

Urza announces a kernel once, when it is first stored; a job that reuses it later (the same
blueprint for the same host is the same kernel), or a kernel announced before Nissa started, is
looked up with `GET /kernels/{id}` — over HTTP (esper.client.UrzaClient), as services talk,
never by importing Urza.
A lookup that fails is tried again after `RETRY_S`; until then that job's parameters read as
unknown, not as zero.
"""

from __future__ import annotations

import logging
import time

from esper.client import UrzaClient
from esper.exceptions import ServiceError, ServiceUnreachableError
from esper.service import Periodic
from nissa.state import NissaState

log = logging.getLogger("nissa.kernels")
RETRY_S = 30.0
POLL_S = 0.5


class KernelLookup:
    def __init__(self, state: NissaState, urza: UrzaClient) -> None:
        self.state = state
        self.client = urza
        self.failed: dict[str, float] = {}
        self._loop = Periodic("kernel lookups", POLL_S, self.look_up_due, logger=log)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.client.aclose()

    async def look_up_due(self) -> None:
        """Kernels a job used whose size is unknown, except those that failed within RETRY_S."""
        now = time.monotonic()
        due = [
            k
            for k in list(self.state.wanted_kernels)
            if now - self.failed.get(k, -RETRY_S) >= RETRY_S
        ]
        for kernel_id in due[:16]:
            await self.lookup(kernel_id)

    async def lookup(self, kernel_id: str) -> None:
        try:
            meta = await self.client.kernel(kernel_id)
        except ServiceUnreachableError as err:
            log.warning("kernel %s not looked up: %s", kernel_id, err.message)
        except ServiceError as err:
            log.info("kernel %s not found in Urza (HTTP %d: %s)", kernel_id, err.status, err.type)
        else:
            if meta.params >= 0:  # a size Nissa cannot add up is as good as none
                self.state.remember_kernel(kernel_id, meta.blueprint, meta.params)
                self.failed.pop(kernel_id, None)
                return
        self.failed[kernel_id] = time.monotonic()
        while len(self.failed) > 1000:
            self.failed.pop(next(iter(self.failed)))

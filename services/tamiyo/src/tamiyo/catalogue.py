"""What Tamiyo asks Urza: the blueprints it may choose from, and the host kind of a kernel.

Both are off the decision path once cached. The blueprint list is kept for `ttl_s` and refreshed
in the background when stale; a decision waits for Urza only when nothing was ever fetched. If
Urza cannot be reached and nothing is cached, the built-in blueprints
(`esper.policy.builtin_catalogue`) stand in (Urza registers them at start-up, so they exist in
every Urza), the decision's evidence says `catalogue: builtin` and a warning is logged. A
kernel's host kind (v1 and v2 telemetry do not carry a layer's kind) is asked once per kernel id
and remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from esper.client import UrzaClient
from esper.contracts.jobs import HostKind
from esper.exceptions import ServiceError
from esper.policy.catalogue import builtin_catalogue
from esper.policy.choice import BlueprintInfo

log = logging.getLogger("tamiyo.catalogue")
MAX_KINDS = 10_000
RETRY_UNKNOWN_S = 60.0


class Catalogue:
    """`urza` None: the built-in blueprints only. The catalogue closes the client it is given."""

    def __init__(self, urza: UrzaClient | None, *, ttl_s: float = 30.0) -> None:
        self.urza_url = urza.base_url if urza is not None else None
        self.ttl_s = ttl_s
        self._client = urza
        self._entries: list[BlueprintInfo] | None = None
        self._fetched_at = 0.0
        self._refresh: asyncio.Task[None] | None = None
        self._kinds: dict[str, HostKind] = {}
        self._unknown: dict[str, float] = {}
        """Kernel ids Urza did not describe, and when to ask again."""
        self._warned = False

    async def entries(self) -> tuple[list[BlueprintInfo], str]:
        """The blueprints, and where they come from: `urza` or `builtin`."""
        if self._client is None:
            return builtin_catalogue(), "builtin"
        if self._entries is None:
            await self._fetch()
        elif time.monotonic() - self._fetched_at > self.ttl_s and not self._refreshing():
            self._refresh = asyncio.get_running_loop().create_task(self._fetch())
        if self._entries is None:
            if not self._warned:
                log.warning("Urza unreachable at %s: choosing from the built-ins", self.urza_url)
                self._warned = True
            return builtin_catalogue(), "builtin"
        return self._entries, "urza"

    async def find(self, name: str) -> BlueprintInfo | None:
        """A blueprint by name, fetching again if it is not known yet (it may be new).
        Raises LookupError when Urza cannot be asked."""
        if self._client is None:
            return next((b for b in builtin_catalogue() if b.name == name), None)
        for attempt in range(2):
            if attempt or self._entries is None:
                await self._fetch()
            if self._entries is None:
                raise LookupError(f"Urza at {self.urza_url} cannot be reached")
            found = next((b for b in self._entries if b.name == name), None)
            if found is not None:
                return found
        return None

    def _refreshing(self) -> bool:
        return self._refresh is not None and not self._refresh.done()

    async def _fetch(self) -> None:
        assert self._client is not None
        try:
            self._entries = [_info(item) for item in await self._client.blueprints()]
            self._fetched_at = time.monotonic()
            self._warned = False
        except (ServiceError, KeyError, TypeError, ValueError) as err:
            log.warning("blueprints not fetched from Urza: %s: %s", type(err).__name__, err)

    async def kernel_kind(self, kernel_id: str) -> HostKind | None:
        """linear or conv2d for a kernel id; None when Urza does not say (asked again later)."""
        if kernel_id in self._kinds:
            return self._kinds[kernel_id]
        if self._client is None or self._unknown.get(kernel_id, 0.0) > time.monotonic():
            return None
        try:
            kind: HostKind = (await self._client.kernel(kernel_id)).host.kind
        except ServiceError as err:
            log.info("kind of kernel %s not known: %s: %s", kernel_id, type(err).__name__, err)
            self._remember(self._unknown, kernel_id, time.monotonic() + RETRY_UNKNOWN_S)
            return None
        self._remember(self._kinds, kernel_id, kind)
        return kind

    @staticmethod
    def _remember(cache: dict[str, Any], key: str, value: Any) -> None:
        if len(cache) >= MAX_KINDS:
            cache.clear()  # a cache, not a record: what is dropped is asked again
        cache[key] = value

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self._client is not None:
            await self._client.aclose()


def _info(item: Any) -> BlueprintInfo:
    spec = item["spec"]
    return BlueprintInfo(
        name=str(spec["name"]),
        hosts=tuple(str(h) for h in spec["hosts"]),
        default_blend="lerp" if spec.get("default_blend") == "lerp" else "add",
        widens=spec.get("widens") is True,
    )

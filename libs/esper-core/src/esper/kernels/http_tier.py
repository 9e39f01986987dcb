"""UrzaKernelTier: kernels from Urza, the kernel registry service, over HTTP.

    GET {base}/kernels/{ref}               200 KernelMeta JSON | 404 unknown
    GET {base}/kernels/{id}/artifact       200 bytes + X-Esper-Kernel-Meta (base64url meta JSON),
                                           X-Esper-Digest, X-Esper-Signature | 404 unknown

Each request is one call of `esper.client.UrzaClient` (the HTTP, bearer token and error parsing
every client of Urza shares). This tier adds the policy: no answer and 429/502/503/504 are retried
(exponential backoff with full jitter, `esper._backoff`; a numeric Retry-After honoured up to
`backoff_max_s`). Requests that still fail feed a circuit breaker, so a dead Urza costs one
exception per call, not `retries` timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar
from urllib.parse import quote

import httpx

from esper._backoff import Backoff
from esper.client.urza import DEFAULT_TIMEOUT_S, UrzaClient
from esper.exceptions import (
    RETRYABLE_STATUSES,
    ConfigError,
    KernelFetchError,
    KernelUnreachableError,
    ServiceError,
    ServiceUnreachableError,
)
from esper.kernels._loops import PerLoop
from esper.kernels.artifact import KernelArtifact
from esper.kernels.cache import KernelSource

log = logging.getLogger(__name__)
T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class HttpTierStats:
    requests: int = 0  # GETs the tier wanted, each counted once however often it was retried
    retries: int = 0  # attempts after the first
    failures: int = 0  # requests that ended in an error (not a 404, not a short circuit)
    breaker_opens: int = 0
    short_circuits: int = 0  # calls refused at once while the breaker was open


class _Unavailable(Exception):
    """Every attempt of a request failed on the network or with a retryable status."""


class _Breaker:
    """Consecutive-failure circuit breaker; thread-safe, since get_sync loops run in threads."""

    def __init__(self, threshold: int, reset_s: float, stats: HttpTierStats) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self._stats = stats
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._trial or time.monotonic() - self._opened_at >= self.reset_s:
                return "half_open"
            return "open"

    def admit(self, what: str) -> bool:
        """Whether this request is the half-open trial; KernelUnreachableError when it may not
        go (Urza is presumed down: a later call may pass)."""
        with self._lock:
            if self._opened_at is None:
                return False
            waited = time.monotonic() - self._opened_at
            if not self._trial and waited >= self.reset_s:
                self._trial = True
                return True
            self._stats.short_circuits += 1
            why = (
                "a trial request is in flight"
                if self._trial
                else f"next trial in {self.reset_s - waited:.2f}s"
            )
        raise KernelUnreachableError(
            f"{what}: circuit open after {self.threshold} consecutive failed requests ({why})"
        )

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failed(self, trial: bool) -> None:
        with self._lock:
            self._failures += 1
            if trial or (self._opened_at is None and self._failures >= self.threshold):
                self._opened_at = time.monotonic()
                self._trial = False
                self._stats.breaker_opens += 1

    def abandoned(self, trial: bool) -> None:
        # A cancelled trial proves nothing; the next call becomes the trial instead.
        if trial:
            with self._lock:
                self._trial = False


class UrzaKernelTier(KernelSource):
    """Kernel ids, tags and artifacts from Urza.

    `retries` is the number of attempts after the first. A half-open trial is a single attempt:
    it only asks whether Urza is back. `transport`, when given, is shared by the client of every
    event loop (meant for tests and custom transports); otherwise each loop's client has its own
    connection pool.
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff_s: float = 0.05,
        backoff_max_s: float = 2.0,
        breaker_threshold: int = 5,
        breaker_reset_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0 or backoff_max_s < backoff_s:
            raise ConfigError(
                f"need 0 <= backoff_s <= backoff_max_s, got {backoff_s} and {backoff_max_s}"
            )
        if breaker_threshold < 1:
            raise ConfigError(f"breaker_threshold must be >= 1, got {breaker_threshold}")
        if breaker_reset_s < 0:
            raise ConfigError(f"breaker_reset_s must be >= 0, got {breaker_reset_s}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._token = token
        self._transport = transport
        self._backoff = Backoff(backoff_s, backoff_max_s)
        self._stats = HttpTierStats()
        self._breaker = _Breaker(breaker_threshold, breaker_reset_s, self._stats)
        self._clients: PerLoop[UrzaClient] = PerLoop(self._connect, _close_client)

    def _connect(self) -> UrzaClient:
        return UrzaClient(
            self.base_url, token=self._token, timeout_s=self.timeout_s, transport=self._transport
        )

    # ------------------------------------------------------------------ KernelSource
    async def resolve(self, ref: str) -> str | None:
        meta = await self._ask(f"/kernels/{quote(ref, safe='')}", lambda urza: urza.kernel(ref))
        return None if meta is None else meta.kernel_id

    async def fetch(self, kernel_id: str) -> KernelArtifact | None:
        path = f"/kernels/{quote(kernel_id, safe='')}"
        download = await self._ask(f"{path}/artifact", lambda urza: urza.download(kernel_id))
        if download is None:
            return None
        meta = download.meta
        if meta is None:
            meta = await self._ask(path, lambda urza: urza.kernel(kernel_id))
            if meta is None:  # deleted between the two requests
                return None
        return download.artifact(meta)

    # ------------------------------------------------------------------ requests
    async def _ask(self, path: str, request: Callable[[UrzaClient], Awaitable[T]]) -> T | None:
        """Urza's answer, or None for a 404; anything else is a KernelFetchError (its subclass
        KernelUnreachableError when Urza did not answer, or answered "not now")."""
        url = self.base_url + path
        trial = self._breaker.admit(f"GET {url}")
        self._stats.requests += 1
        try:
            answer = await self._attempts(url, request, 1 if trial else self.retries + 1)
        except _Unavailable as err:
            self._stats.failures += 1
            self._breaker.failed(trial)
            raise KernelUnreachableError(str(err)) from err.__cause__
        except ServiceError as err:
            # Any answer that is not retryable means Urza is up, whatever it said.
            self._breaker.succeeded()
            if err.status == 404:
                if err.type != "unknown_kernel":
                    log.warning(
                        "GET %s: 404 without an unknown_kernel error: is the URL right?", url
                    )
                return None
            self._stats.failures += 1
            raise KernelFetchError(f"GET {url}: HTTP {err.status}: {err.message}") from err
        except BaseException:
            self._breaker.abandoned(trial)
            raise
        self._breaker.succeeded()
        return answer

    async def _attempts(
        self, url: str, request: Callable[[UrzaClient], Awaitable[T]], attempts: int
    ) -> T:
        urza = await self._clients.get()
        failure = ""
        cause: BaseException | None = None
        delay = 0.0
        for attempt in range(attempts):
            if attempt:
                self._stats.retries += 1
                await asyncio.sleep(delay)
            try:
                return await request(urza)
            except ServiceUnreachableError as err:
                failure, cause = err.message, err.__cause__
                delay = self._backoff.delay(attempt)
            except ServiceError as err:
                if err.status not in RETRYABLE_STATUSES:
                    raise
                failure, cause = f"GET {url}: HTTP {err.status}: {err.message}", None
                if err.retry_after_s:  # "Retry-After: 0" gets the backoff: retries stay spread
                    delay = min(err.retry_after_s, self.backoff_max_s)
                else:
                    delay = self._backoff.delay(attempt)
        tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
        raise _Unavailable(f"{failure} (after {tries})") from cause

    # ------------------------------------------------------------------ the rest
    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state

    async def aclose(self) -> None:
        await self._clients.aclose()

    def stats(self) -> dict[str, int]:
        return dict(vars(self._stats))


async def _close_client(urza: UrzaClient) -> None:
    await urza.aclose()

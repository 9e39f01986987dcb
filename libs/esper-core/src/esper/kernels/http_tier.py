"""UrzaKernelTier: kernels from Urza, the kernel registry service, over HTTP.

    GET {base}/kernels/{ref}               200 KernelMeta JSON | 404 unknown
    GET {base}/kernels/{id}/artifact       200 bytes + X-Esper-Kernel-Meta (base64url meta JSON),
                                           X-Esper-Digest, X-Esper-Signature | 404 unknown

Transport errors and 429/502/503/504 are retried (exponential backoff, full jitter, a numeric
Retry-After honoured up to `backoff_max_s`). Requests that still fail feed a circuit breaker, so a
dead Urza costs one exception per call, not `retries` timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from esper.exceptions import ArtifactError, ConfigError, KernelFetchError
from esper.kernels._loops import PerLoop
from esper.kernels.artifact import KernelArtifact, KernelMeta
from esper.kernels.cache import KernelSource

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
META_HEADER = "X-Esper-Kernel-Meta"
DIGEST_HEADER = "X-Esper-Digest"
SIGNATURE_HEADER = "X-Esper-Signature"


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
        """Whether this request is the half-open trial; KernelFetchError when it may not go."""
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
        raise KernelFetchError(
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
        timeout_s: float = 10.0,
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
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport
        self._stats = HttpTierStats()
        self._breaker = _Breaker(breaker_threshold, breaker_reset_s, self._stats)
        self._clients: PerLoop[httpx.AsyncClient] = PerLoop(self._connect, _close_client)

    def _connect(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers=self._headers, timeout=self.timeout_s, transport=self._transport
        )

    # ------------------------------------------------------------------ KernelSource
    async def resolve(self, ref: str) -> str | None:
        response = await self._get(f"/kernels/{quote(ref, safe='')}")
        if response is None:
            return None
        return _meta_from_body(response).kernel_id

    async def fetch(self, kernel_id: str) -> KernelArtifact | None:
        path = f"/kernels/{quote(kernel_id, safe='')}"
        response = await self._get(f"{path}/artifact")
        if response is None:
            return None
        meta = _meta_from_header(response)
        if meta is None:
            described = await self._get(path)
            if described is None:  # deleted between the two requests
                return None
            meta = _meta_from_body(described)
        if meta.kernel_id != kernel_id:
            raise ArtifactError(
                f"GET {response.url}: Urza sent kernel {meta.kernel_id} when asked for {kernel_id}"
            )
        digest = response.headers.get(DIGEST_HEADER)
        if digest is not None and digest != meta.digest:
            raise ArtifactError(
                f"GET {response.url}: kernel {kernel_id}: {DIGEST_HEADER} {digest} contradicts "
                f"its meta's digest {meta.digest}"
            )
        signature = response.headers.get(SIGNATURE_HEADER)
        if signature and meta.hmac_sha256 is None:
            # The cache checks the HMAC against its own key, so taking it from a header is safe.
            meta = meta.model_copy(update={"hmac_sha256": signature})
        return KernelArtifact(meta, response.content)

    # ------------------------------------------------------------------ requests
    async def _get(self, path: str) -> httpx.Response | None:
        """The 200 response, or None for a 404; anything else is a KernelFetchError."""
        url = self.base_url + path
        trial = self._breaker.admit(f"GET {url}")
        self._stats.requests += 1
        try:
            response = await self._send(url, 1 if trial else self.retries + 1)
        except _Unavailable as err:
            self._stats.failures += 1
            self._breaker.failed(trial)
            raise KernelFetchError(str(err)) from err.__cause__
        except BaseException:
            self._breaker.abandoned(trial)
            raise
        # Any answer that is not retryable means Urza is up, whatever it said.
        self._breaker.succeeded()
        if response.status_code == 200:
            return response
        if response.status_code == 404:
            if _error_type(response) != "unknown_kernel":
                log.warning("GET %s: 404 without an unknown_kernel error: is the URL right?", url)
            return None
        self._stats.failures += 1
        raise KernelFetchError(
            f"GET {url}: HTTP {response.status_code}: {_error_message(response)}"
        )

    async def _send(self, url: str, attempts: int) -> httpx.Response:
        client = await self._clients.get()
        failure = ""
        cause: Exception | None = None
        delay = 0.0
        for attempt in range(attempts):
            if attempt:
                self._stats.retries += 1
                await asyncio.sleep(delay)
            try:
                response = await client.get(url)
            except httpx.TransportError as err:
                failure, cause = f"{type(err).__name__}: {err}", err
                delay = self._backoff(attempt)
                continue
            if response.status_code not in RETRYABLE_STATUSES:
                return response
            failure = f"HTTP {response.status_code}: {_error_message(response)}"
            cause = None
            delay = _retry_after(response, self.backoff_max_s) or self._backoff(attempt)
        tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
        raise _Unavailable(f"GET {url}: {failure} (after {tries})") from cause

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** min(attempt, 30))
        return random.uniform(0.0, ceiling)

    # ------------------------------------------------------------------ the rest
    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state

    async def aclose(self) -> None:
        await self._clients.aclose()

    def stats(self) -> dict[str, int]:
        return dict(vars(self._stats))


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    """A numeric Retry-After in seconds, capped; None when absent or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


def _error(response: httpx.Response) -> dict[str, object]:
    try:
        body = response.json()
    except ValueError:  # not JSON, or not UTF-8
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _error_type(response: httpx.Response) -> str | None:
    kind = _error(response).get("type")
    return kind if isinstance(kind, str) else None


def _error_message(response: httpx.Response) -> str:
    message = _error(response).get("message")
    if isinstance(message, str) and message:
        return message
    return response.text.strip()[:200] or response.reason_phrase


def _meta_from_body(response: httpx.Response) -> KernelMeta:
    try:
        return KernelMeta.model_validate_json(response.content)
    except ValidationError as err:
        raise KernelFetchError(
            f"GET {response.url}: the body is not a KernelMeta: {str(err)[:300]}"
        ) from None


def _meta_from_header(response: httpx.Response) -> KernelMeta | None:
    encoded = response.headers.get(META_HEADER)
    if encoded is None:
        return None
    try:
        # Padding is restored, so a server that strips it is understood too.
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return KernelMeta.model_validate_json(raw)
    except ValueError as err:  # binascii.Error and pydantic's ValidationError are ValueErrors
        log.warning(
            "GET %s: unreadable %s header (%s); asking for the meta",
            response.url,
            META_HEADER,
            type(err).__name__,
        )
        return None


async def _close_client(client: httpx.AsyncClient) -> None:
    await client.aclose()

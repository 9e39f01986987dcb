"""UrzaClient: the one way to reach Urza over HTTP (httpx, async).

    GET  /kernels/{ref}             kernel(ref): the meta of a kernel, by id or tag
    GET  /kernels/{id}/artifact     download(id), artifact(id): the bytes, with the meta, digest
                                    and signature their headers vouch for
    GET  /blueprints                blueprints()
    POST /kernels/compile           compile(...), kernel_for(...)
    POST /kernels                   upload(...)

Every error is an `esper.exceptions.ServiceError` (its `status` and `type` are Urza's); no answer
at all is a `ServiceUnreachableError`. The client tries each request once: the HTTP kernel tier
(esper.kernels.http_tier) adds retries and a circuit breaker on top.

It is also a `KernelProvider`: a training job's SeedOrchestrator asks it for the kernel of a
blueprint on a layer, and the kernel cache then fetches the bytes (by id) through its tiers.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from esper.client import calls
from esper.client._http import async_http, error_from, unreachable
from esper.client.calls import Call
from esper.contracts.kernels import HostSignature, KernelMeta
from esper.contracts.kernels_api import CompileRequest, KernelResult, KernelUpload
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import ArtifactError, ServiceError
from esper.kernels.artifact import KernelArtifact

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = "urza"
DEFAULT_URL = "http://127.0.0.1:8004"
DEFAULT_TIMEOUT_S = 10.0
COMPILE_TIMEOUT_S = 120.0
"""Compiles and uploads: a first compile of a large conv kernel takes seconds, and Urza queues
compiles behind one another."""
META_HEADER = "X-Esper-Kernel-Meta"
DIGEST_HEADER = "X-Esper-Digest"
SIGNATURE_HEADER = "X-Esper-Signature"


@dataclass(frozen=True)
class KernelDownload:
    """A kernel's bytes as Urza sent them, and what the answer's headers say about them: the
    meta (None when the header was missing or unreadable), the digest and the signature."""

    kernel_id: str
    """The id asked for."""
    url: str
    data: bytes
    meta: KernelMeta | None
    digest: str | None
    signature: str | None

    def artifact(self, meta: KernelMeta | None = None) -> KernelArtifact:
        """The artifact, once the headers agree with the meta (`meta` when given: the kernel's
        meta asked separately, for a download that came without one). ArtifactError where they
        disagree. The bytes themselves are checked by the kernel cache, against its own key."""
        if meta is None:
            meta = self.meta
        if meta is None:
            raise ArtifactError(f"GET {self.url}: kernel {self.kernel_id} came without its meta")
        if meta.kernel_id != self.kernel_id:
            raise ArtifactError(
                f"GET {self.url}: Urza sent kernel {meta.kernel_id} when asked for {self.kernel_id}"
            )
        if self.digest is not None and self.digest != meta.digest:
            raise ArtifactError(
                f"GET {self.url}: kernel {self.kernel_id}: {DIGEST_HEADER} {self.digest} "
                f"contradicts its meta's digest {meta.digest}"
            )
        if self.signature and meta.hmac_sha256 is None:
            # The cache checks the HMAC against its own key, so taking it from a header is safe.
            meta = meta.model_copy(update={"hmac_sha256": self.signature})
        return KernelArtifact(meta, self.data)


class UrzaClient:
    """`base_url` is Urza's (e.g. `UrzaLinkSettings.urza_client()` builds one from a service's
    settings); `token` its bearer token. `timeout_s` bounds each request but compiles and uploads,
    which get `compile_timeout_s`. `transport` is for tests and custom transports."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.compile_timeout_s = compile_timeout_s
        self._http = async_http(
            base_url=self.base_url, token=token, timeout_s=timeout_s, transport=transport
        )

    # ---------------------------------------------------------------- kernels
    async def kernel(self, ref: str) -> KernelMeta:
        """A kernel's meta by id or tag; a ServiceError of status 404 (`unknown_kernel`) when
        Urza knows neither."""
        return await self._run(calls.kernel(ref))

    async def download(self, kernel_id: str) -> KernelDownload:
        """The kernel's bytes and what the answer's headers vouch for, unchecked (one request:
        see `artifact` for the whole fetch)."""
        return await self._run(
            Call(
                SERVICE,
                "GET",
                f"/kernels/{quote(kernel_id, safe='')}/artifact",
                lambda r: _download(kernel_id, r),
            )
        )

    async def artifact(self, kernel_id: str) -> KernelArtifact:
        """The kernel's bytes and meta (asked for separately when the artifact's header had
        none); ArtifactError when the headers contradict the meta."""
        download = await self.download(kernel_id)
        if download.meta is not None:
            return download.artifact()
        return download.artifact(await self.kernel(kernel_id))

    async def compile(
        self,
        blueprint: str,
        host: HostSignature,
        fmt: KernelFormat = "export",
        *,
        tags: Sequence[str] = (),
    ) -> KernelResult:
        request = CompileRequest(blueprint=blueprint, host=host, format=fmt, tags=list(tags))
        return await self._run(calls.compile_kernel(request), timeout_s=self.compile_timeout_s)

    async def kernel_for(self, blueprint: str, host: HostSignature, fmt: KernelFormat) -> str:
        return (await self.compile(blueprint, host, fmt)).kernel.kernel_id

    async def upload(self, upload: KernelUpload, data: bytes) -> KernelResult:
        return await self._run(calls.upload_kernel(upload, data), timeout_s=self.compile_timeout_s)

    # ------------------------------------------------------------- blueprints
    async def blueprints(self) -> list[dict[str, Any]]:
        """The stored blueprints as Urza lists them (`{"spec": {...}, "builtin": ...}`)."""
        return await self._run(calls.blueprints())

    # ------------------------------------------------------------------ plumbing
    async def _run(self, call: Call[T], *, timeout_s: float | None = None) -> T:
        options: dict[str, Any] = dict(call.kwargs)
        if timeout_s is not None:
            options["timeout"] = timeout_s
        try:
            response = await self._http.request(call.method, call.path, **options)
        except httpx.HTTPError as err:
            raise unreachable(SERVICE, f"{call.method} {self.base_url}{call.path}", err) from err
        if not response.is_success:
            raise error_from(SERVICE, response)
        try:
            return call.parse(response)
        except (ValueError, KeyError, TypeError) as err:  # pydantic's ValidationError included
            raise ServiceError(
                SERVICE,
                response.status_code,
                "invalid_response",
                f"unreadable answer: {type(err).__name__}: {str(err)[:300]}",
            ) from None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> UrzaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _download(kernel_id: str, response: httpx.Response) -> KernelDownload:
    return KernelDownload(
        kernel_id=kernel_id,
        url=str(response.url),
        data=response.content,
        meta=_meta_from_header(response),
        digest=response.headers.get(DIGEST_HEADER),
        signature=response.headers.get(SIGNATURE_HEADER),
    )


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

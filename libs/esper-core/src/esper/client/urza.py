"""UrzaClient: compile kernels and upload trained ones (httpx, async).

It is also a `KernelProvider`: a training job's SeedOrchestrator asks it for the kernel of a
blueprint on a layer, and the kernel cache then fetches the bytes (by id) through its tiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from esper.contracts.kernels_api import CompileRequest, KernelResult, KernelUpload
from esper.exceptions import ServiceError
from esper.kernels.artifact import KernelFormat, KernelMeta
from esper.signature import HostSignature


class UrzaClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 120.0,  # a first compile of a large conv kernel can take seconds
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ServiceError("urza", 503, "unreachable", f"{type(err).__name__}: {err}") from err
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            kind, message = str(error["type"]), str(error["message"])
        except Exception:
            kind, message = "error", response.text[:500]
        raise ServiceError("urza", response.status_code, kind, message)

    async def compile(
        self,
        blueprint: str,
        host: HostSignature,
        fmt: KernelFormat = "export",
        *,
        tags: Sequence[str] = (),
    ) -> KernelResult:
        request = CompileRequest(blueprint=blueprint, host=host, format=fmt, tags=list(tags))
        response = await self._call(
            "POST", "/kernels/compile", json=request.model_dump(mode="json")
        )
        return KernelResult.model_validate(response.json())

    async def kernel_for(self, blueprint: str, host: HostSignature, fmt: KernelFormat) -> str:
        return (await self.compile(blueprint, host, fmt)).kernel.kernel_id

    async def upload(self, upload: KernelUpload, data: bytes) -> KernelResult:
        response = await self._call(
            "POST",
            "/kernels",
            data={"meta": upload.model_dump_json()},
            files={"artifact": ("kernel.bin", data, "application/octet-stream")},
        )
        return KernelResult.model_validate(response.json())

    async def get(self, ref: str) -> KernelMeta:
        return KernelMeta.model_validate((await self._call("GET", f"/kernels/{ref}")).json())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> UrzaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

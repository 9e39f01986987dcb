"""`AsyncEsper`: the asynchronous client of the whole stack (httpx.AsyncClient)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from esper.client import calls
from esper.client._http import async_http, raise_for_error, unreachable
from esper.client.calls import Call, Event, ServiceUrls, SSEParser
from esper.contracts import JobSpec, JobSubmitted, JobView, Page
from esper.contracts.kernels import KernelMeta

T = TypeVar("T")


class AsyncEsper:
    """The same API as `Esper`, awaited."""

    def __init__(
        self,
        urls: ServiceUrls | None = None,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.urls = urls or ServiceUrls.from_env()
        token = token if token is not None else os.environ.get("ESPER_API_TOKEN")
        self._http = async_http(token=token, timeout_s=timeout_s, transport=transport)

    async def run(self, call: Call[T], *, accept: tuple[int, ...] = ()) -> T:
        url = self.urls.of(call.service) + call.path
        try:
            response = await self._http.request(call.method, url, **call.kwargs)
        except httpx.HTTPError as err:
            raise unreachable(call.service, f"{call.method} {url}", err) from err
        if response.status_code not in accept:
            raise_for_error(call.service, response)
        return call.parse(response)

    async def submit(
        self, spec: JobSpec | dict[str, Any], *, code: Path | None = None
    ) -> JobSubmitted:
        """`code`: the directory a `python` model or dataset is imported from, sent zipped."""
        return await self.run(calls.submit_job(spec, await _zipped(code)))

    async def submit_yaml(self, text: str, *, code: Path | None = None) -> JobSubmitted:
        return await self.run(calls.submit_job_yaml(text, await _zipped(code)))

    async def job(self, job_id: str) -> JobView:
        return await self.run(calls.job(job_id))

    async def jobs(self, status: str | None = None, limit: int = 100) -> Page[JobView]:
        return await self.run(calls.jobs(status, limit))

    async def stop(self, job_id: str) -> JobView:
        return await self.run(calls.stop_job(job_id))

    async def logs(self, job_id: str, tail: int | None = None) -> str:
        return await self.run(calls.job_logs(job_id, tail))

    async def checkpoint(self, job_id: str) -> bytes:
        return await self.run(calls.job_checkpoint(job_id))

    async def events(self, job_id: str, timeout_s: float | None = None) -> AsyncIterator[Event]:
        url = f"{self.urls.tolaria}/jobs/{job_id}/events"
        parser = SSEParser()
        async with self._http.stream("GET", url, timeout=timeout_s) as response:
            if not response.is_success:
                await response.aread()
                raise_for_error("tolaria", response)
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    async def kernels(self, **filters: Any) -> Page[KernelMeta]:
        return await self.run(calls.kernels(**filters))

    async def blueprints(self) -> list[dict[str, Any]]:
        return await self.run(calls.blueprints())

    async def readiness(self, service: str) -> dict[str, Any]:
        return await self.run(calls.readiness(service), accept=(503,))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncEsper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _zipped(code: Path | None) -> bytes | None:
    # In a thread: reading and compressing a directory must not stall the event loop.
    return await asyncio.to_thread(calls.zip_code, code) if code is not None else None

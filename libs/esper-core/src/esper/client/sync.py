"""`Esper`: the synchronous client of the whole stack (httpx.Client)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from esper.client import calls
from esper.client._http import raise_for_error, sync_http, unreachable
from esper.client.calls import Call, Event, ServiceUrls, SSEParser
from esper.contracts import JobSpec, JobSubmitted, JobView, Page, RunEnd, RunReply, RunReport
from esper.contracts.kernels import KernelMeta

T = TypeVar("T")


class Esper:
    """`Esper()` talks to the services at `ESPER_<SERVICE>_URL` (default localhost:8001–8004)
    with `ESPER_API_TOKEN` as bearer token. Errors are `esper.exceptions.ServiceError`."""

    def __init__(
        self,
        urls: ServiceUrls | None = None,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.urls = urls or ServiceUrls.from_env()
        token = token if token is not None else os.environ.get("ESPER_API_TOKEN")
        self._http = sync_http(token=token, timeout_s=timeout_s, transport=transport)

    def run(self, call: Call[T], *, accept: tuple[int, ...] = ()) -> T:
        url = self.urls.of(call.service) + call.path
        try:
            response = self._http.request(call.method, url, **call.kwargs)
        except httpx.HTTPError as err:
            raise unreachable(call.service, f"{call.method} {url}", err) from err
        if response.status_code not in accept:
            raise_for_error(call.service, response)
        return call.parse(response)

    # jobs
    def submit(self, spec: JobSpec | dict[str, Any], *, code: Path | None = None) -> JobSubmitted:
        """`code`: the directory a `python` model or dataset is imported from, sent zipped."""
        return self.run(calls.submit_job(spec, calls.zip_code(code) if code else None))

    def submit_yaml(self, text: str, *, code: Path | None = None) -> JobSubmitted:
        return self.run(calls.submit_job_yaml(text, calls.zip_code(code) if code else None))

    def job(self, job_id: str) -> JobView:
        return self.run(calls.job(job_id))

    def jobs(self, status: str | None = None, limit: int = 100) -> Page[JobView]:
        return self.run(calls.jobs(status, limit))

    def stop(self, job_id: str) -> JobView:
        return self.run(calls.stop_job(job_id))

    def logs(self, job_id: str, tail: int | None = None) -> str:
        return self.run(calls.job_logs(job_id, tail))

    def checkpoint(self, job_id: str) -> bytes:
        return self.run(calls.job_checkpoint(job_id))

    def report_run(self, job_id: str, body: RunReport) -> RunReply:
        return self.run(calls.report_run(job_id, body))

    def end_run(self, job_id: str, body: RunEnd) -> JobView:
        return self.run(calls.end_run(job_id, body))

    def events(self, job_id: str, timeout_s: float | None = None) -> Iterator[Event]:
        """The job's events from its start, then live, ending with an `end` event."""
        url = f"{self.urls.tolaria}/jobs/{job_id}/events"
        parser = SSEParser()
        with self._http.stream("GET", url, timeout=timeout_s) as response:
            if not response.is_success:
                response.read()
                raise_for_error("tolaria", response)
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    # urza
    def kernels(self, **filters: Any) -> Page[KernelMeta]:
        return self.run(calls.kernels(**filters))

    def blueprints(self) -> list[dict[str, Any]]:
        return self.run(calls.blueprints())

    # probes
    def readiness(self, service: str) -> dict[str, Any]:
        return self.run(calls.readiness(service), accept=(503,))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Esper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

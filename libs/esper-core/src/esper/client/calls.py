"""What the clients ask the services, as data: each endpoint builds a `Call` (service, method,
path, arguments, how to read the answer). `Esper` runs calls with httpx.Client, `AsyncEsper` and
`UrzaClient` with httpx.AsyncClient, so they speak the same API and none repeats its details."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from esper.contracts import JobSpec, JobSubmitted, JobView, Page, RunEnd, RunReply, RunReport
from esper.contracts.kernels import KernelMeta
from esper.contracts.kernels_api import CompileRequest, KernelResult, KernelUpload
from esper.exceptions import ConfigError

T = TypeVar("T")
SERVICES = ("tolaria", "tamiyo", "nissa", "urza")
DEFAULT_PORTS = {"tolaria": 8001, "tamiyo": 8002, "nissa": 8003, "urza": 8004}


@dataclass(frozen=True)
class ServiceUrls:
    """Where each service answers: `ESPER_<SERVICE>_URL`, else localhost on its default port."""

    tolaria: str
    tamiyo: str
    nissa: str
    urza: str

    @classmethod
    def from_env(cls, **overrides: str | None) -> ServiceUrls:
        urls = {}
        for name in SERVICES:
            given = overrides.get(name) or os.environ.get(f"ESPER_{name.upper()}_URL")
            urls[name] = (given or f"http://127.0.0.1:{DEFAULT_PORTS[name]}").rstrip("/")
        return cls(**urls)

    def of(self, service: str) -> str:
        url: str = getattr(self, service)
        return url


@dataclass(frozen=True)
class Call(Generic[T]):
    service: str
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


_JSON = {"Content-Type": "application/json"}


def _json(response: httpx.Response) -> Any:
    return response.json()


# ------------------------------------------------------------------ tolaria
def submit_job(spec: JobSpec | dict[str, Any], code: bytes | None = None) -> Call[JobSubmitted]:
    """`code`: a zip (`zip_code`) the spec's `python` entrypoints import; sent with the spec."""
    body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
    if code is not None:
        return _submit_with_code(json.dumps(body), code)
    return Call(
        "tolaria", "POST", "/jobs", lambda r: JobSubmitted.model_validate(r.json()), {"json": body}
    )


def submit_job_yaml(text: str, code: bytes | None = None) -> Call[JobSubmitted]:
    if code is not None:
        return _submit_with_code(text, code)
    return Call(
        "tolaria",
        "POST",
        "/jobs",
        lambda r: JobSubmitted.model_validate(r.json()),
        {"content": text.encode(), "headers": {"Content-Type": "application/yaml"}},
    )


def _submit_with_code(spec_text: str, code: bytes) -> Call[JobSubmitted]:
    return Call(
        "tolaria",
        "POST",
        "/jobs",
        lambda r: JobSubmitted.model_validate(r.json()),
        {"files": {"spec": (None, spec_text), "code": ("code.zip", code, "application/zip")}},
    )


_NOT_CODE = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".venv"}


def zip_code(directory: Path) -> bytes:
    """A directory as the zip of a job's code: its files in name order with fixed timestamps,
    so the same code always zips to the same bytes (Tolaria keeps it once, by digest); caches,
    virtual environments and version control left out. A symbolic link raises ConfigError:
    Tolaria refuses zips with links."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if _NOT_CODE & set(relative.parts) or path.suffix == ".pyc":
                continue
            if path.is_symlink():
                raise ConfigError(f"{path} is a symbolic link: copy what it points to instead")
            if path.is_file():
                entry = zipfile.ZipInfo(relative.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                entry.external_attr = 0o644 << 16
                entry.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(entry, path.read_bytes())
    return buffer.getvalue()


def job(job_id: str) -> Call[JobView]:
    return Call("tolaria", "GET", f"/jobs/{job_id}", lambda r: JobView.model_validate(r.json()))


def jobs(
    status: str | None = None, limit: int = 100, cursor: str | None = None
) -> Call[Page[JobView]]:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return Call(
        "tolaria",
        "GET",
        "/jobs",
        lambda r: Page[JobView].model_validate(r.json()),
        {"params": params},
    )


def stop_job(job_id: str) -> Call[JobView]:
    return Call(
        "tolaria", "POST", f"/jobs/{job_id}/stop", lambda r: JobView.model_validate(r.json())
    )


def job_logs(job_id: str, tail: int | None = None) -> Call[str]:
    params = {"tail": tail} if tail else {}
    return Call("tolaria", "GET", f"/jobs/{job_id}/logs", lambda r: r.text, {"params": params})


def job_checkpoint(job_id: str) -> Call[bytes]:
    return Call("tolaria", "GET", f"/jobs/{job_id}/checkpoint", lambda r: r.content)


def report_run(job_id: str, body: RunReport) -> Call[RunReply]:
    """An external run's report (esper.contracts.runs); at a decision point the reply waits
    for the controller's answer."""
    return Call(
        "tolaria",
        "POST",
        f"/jobs/{job_id}/reports",
        lambda r: RunReply.model_validate(r.json()),
        {"content": body.model_dump_json(), "headers": _JSON},
    )


def end_run(job_id: str, body: RunEnd) -> Call[JobView]:
    return Call(
        "tolaria",
        "POST",
        f"/jobs/{job_id}/end",
        lambda r: JobView.model_validate(r.json()),
        {"content": body.model_dump_json(), "headers": _JSON},
    )


# --------------------------------------------------------------------- urza
def kernels(
    blueprint: str | None = None, name: str | None = None, tag: str | None = None, limit: int = 100
) -> Call[Page[KernelMeta]]:
    params = {k: v for k, v in {"blueprint": blueprint, "name": name, "tag": tag}.items() if v}
    return Call(
        "urza",
        "GET",
        "/kernels",
        lambda r: Page[KernelMeta].model_validate(r.json()),
        {"params": {**params, "limit": limit}},
    )


def kernel(ref: str) -> Call[KernelMeta]:
    """A kernel's meta by id or tag; the ref is quoted into one path segment, so a tag can never
    reach another route."""
    return Call(
        "urza",
        "GET",
        f"/kernels/{quote(ref, safe='')}",
        lambda r: KernelMeta.model_validate_json(r.content),
    )


def blueprints() -> Call[list[dict[str, Any]]]:
    return Call("urza", "GET", "/blueprints", lambda r: list(r.json()["items"]))


def compile_kernel(request: CompileRequest) -> Call[KernelResult]:
    return Call(
        "urza",
        "POST",
        "/kernels/compile",
        lambda r: KernelResult.model_validate_json(r.content),
        {"json": request.model_dump(mode="json")},
    )


def upload_kernel(upload: KernelUpload, data: bytes) -> Call[KernelResult]:
    return Call(
        "urza",
        "POST",
        "/kernels",
        lambda r: KernelResult.model_validate_json(r.content),
        {
            "data": {"meta": upload.model_dump_json()},
            "files": {"artifact": ("kernel.bin", data, "application/octet-stream")},
        },
    )


# -------------------------------------------------------------------- probes
def readiness(service: str) -> Call[dict[str, Any]]:
    """`/readyz` of a service; a 503 (not ready) is an answer here, not an error."""
    return Call(service, "GET", "/readyz", _json)


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: `type` is the message type (`telemetry.report`,
    `event.seed_transition`, …, or `end`), `data` the envelope (or, for `end`, the status)."""

    id: str | None
    type: str
    data: dict[str, Any]

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = self.data.get("payload", self.data)
        return payload


class SSEParser:
    """Lines of a text/event-stream → Events (the subset the services send: id, event, data)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                return None
            event = Event(self._id, self._type, json.loads("\n".join(self._data)))
            self._type, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None

"""Jobs, in the conventions of Ray Jobs: submit (202), list, inspect, stop, follow the events,
read the logs, download the checkpoint, delete when finished."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from esper.bus.producer import FIELD
from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    Envelope,
    JobQueued,
    JobSpec,
    JobStatus,
    JobSubmitted,
    JobView,
    Page,
)
from esper.service import ApiError, RequireToken, error_responses
from esper.specyaml import load_spec_yaml
from tolaria import checkpoint, usercode_submit
from tolaria.dataformats import relative_message
from tolaria.deps import SettingsDep, StoreDep
from tolaria.errors import SpecError
from tolaria.external import RunRelay
from tolaria.jobstore import JobStore, UnknownJobError
from tolaria.runtime import control_group
from tolaria.settings import TolariaSettings
from tolaria.usercode import job_code_dir
from tolaria.validation import check_executor, check_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
_ERRORS = error_responses(404, 409, 413, 422)
SOURCE = "tolaria"
_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
"""A Redis stream entry id, which every event's `id:` is."""


async def _parse_spec(request: Request) -> JobSpec:
    """JSON, or YAML with `Content-Type: application/yaml`."""
    body = await request.body()
    limit = request.app.state.settings.max_spec_bytes
    if len(body) > limit:  # the route's body limit leaves room for a multipart zip
        raise ApiError(
            413,
            "payload_too_large",
            f"a spec is at most {limit} bytes",
            ["body"],
            limit_bytes=limit,
        )
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    return _validated(await _load_document(body, kind))


async def _read_submission(
    request: Request, settings: TolariaSettings
) -> tuple[JobSpec, usercode_submit.CodeUpload | None]:
    """A spec body, or a multipart body of a spec and the code zip it runs."""
    if not usercode_submit.is_multipart(request):
        return await _parse_spec(request), None
    text, upload = await usercode_submit.read_multipart(request, settings)
    document = await _load_document(text, "application/yaml")  # JSON is YAML
    if upload is not None:
        document = usercode_submit.with_code_digest(document, upload)
    return _validated(document), upload


async def _load_document(body: bytes, kind: str) -> Any:
    try:
        if kind in ("application/yaml", "application/x-yaml", "text/yaml"):
            # In a thread and bounded: a big document must not stall the event loop.
            data: Any = await asyncio.to_thread(load_spec_yaml, body)
        else:
            data = json.loads(body or b"null")
    except (ValueError, yaml.YAMLError) as err:
        raise ApiError(
            422, "validation_error", f"body is not valid {kind}: {err}", ["body"]
        ) from None
    return data


def _validated(data: Any) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where: list[str | int] = ["body", *first["loc"]]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ApiError(
            422,
            "validation_error",
            f"{'.'.join(map(str, where))}: {first['msg']}{more}",
            where,
            errors=[
                {"location": ["body", *e["loc"]], "message": e["msg"]} for e in err.errors()[:20]
            ],
        ) from None


@router.post(
    "",
    response_model=JobSubmitted,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[RequireToken],
    responses={**_ERRORS, 200: {"model": JobSubmitted}},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
                "application/yaml": {},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "string", "description": "the spec, JSON or YAML"},
                            "code": {
                                "type": "string",
                                "format": "binary",
                                "description": "a zip of the code `python` entrypoints import",
                            },
                        },
                        "required": ["spec"],
                    }
                },
            },
            "required": True,
        }
    },
)
async def submit_job(
    request: Request, store: StoreDep, settings: SettingsDep, response: Response
) -> JobSubmitted:
    """Queue a job (202). With a `submission_id` that was used before, the job it created
    (200, `created: false`). A spec that cannot run is refused with 422 and nothing is queued."""
    spec, upload = await _read_submission(request, settings)
    if spec.submission_id is not None:
        existing = await store.redis.get(store.submission_key(spec.submission_id))
        if existing is not None:
            view = await store.get(existing.decode() if isinstance(existing, bytes) else existing)
            response.status_code = status.HTTP_200_OK
            return JobSubmitted(job_id=view.job_id, status=view.status, created=False)
    if spec.external:
        return await _register_external(request, store, settings, spec)
    try:
        check_executor(spec, settings)
        if spec.code is not None:  # the user's code is checked in a child process, never here
            await usercode_submit.check_code(spec, upload, settings)
        else:
            await asyncio.to_thread(
                check_spec, spec, settings.data_dir, settings.max_job_memory_bytes
            )
    except SpecError as err:
        # Files named as the spec names them, relative to the data dir: its place on the server
        # is not the client's business. Edited in place: a subclass keeps its own answer.
        err.message = relative_message(err.message, settings.data_dir)
        err.args = (relative_message(str(err), settings.data_dir),)
        raise
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    if upload is not None:  # every check passed: now the zip is kept
        await asyncio.to_thread(usercode_submit.keep, upload, settings)
    view, created = await store.create(job_id, spec)
    if not created:
        response.status_code = status.HTTP_200_OK
        return JobSubmitted(job_id=view.job_id, status=view.status, created=False)
    await _create_control_group(store, settings, job_id)
    await request.app.state.producer.publish(
        Envelope.wrap(JobQueued(job_id=job_id), source=SOURCE, job_id=job_id)
    )
    return JobSubmitted(job_id=job_id, status="PENDING", created=True)


async def _create_control_group(store: JobStore, settings: TolariaSettings, job_id: str) -> None:
    """The job's control group exists before the job runs: no decision is missed."""
    try:
        await store.redis.xgroup_create(
            settings.bus.stream("control"), control_group(job_id), id="$", mkstream=True
        )
    except Exception as err:
        if "BUSYGROUP" not in str(err):
            raise


async def _register_external(
    request: Request, store: JobStore, settings: TolariaSettings, spec: JobSpec
) -> JobSubmitted:
    """An external run's job: RUNNING at once, never queued (its trainer is the caller)."""
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    view, created = await store.create(job_id, spec)
    if created:
        await _create_control_group(store, settings, job_id)
    started = await RunRelay(store, request.app.state.producer, settings).start(view)
    return JobSubmitted(job_id=started.job_id, status=started.status, created=created)


@router.get("", response_model=Page[JobView], responses=_ERRORS)
async def list_jobs(
    store: StoreDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,12}$")] = None,
) -> Page[JobView]:
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""
    views, next_cursor = await store.page(status=status_filter, limit=limit, cursor=cursor)
    return Page[JobView](items=views, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobView, responses=_ERRORS)
async def get_job(job_id: JobId, store: StoreDep) -> JobView:
    return await store.get(job_id)


@router.post(
    "/{job_id}/stop", response_model=JobView, dependencies=[RequireToken], responses=_ERRORS
)
async def stop_job(job_id: JobId, store: StoreDep) -> JobView:
    """A queued job ends STOPPED at once; a running one within a training step (it keeps its
    checkpoint). Stopping a finished job changes nothing."""
    await store.get(job_id)
    return await store.request_stop(job_id)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[RequireToken],
    responses=_ERRORS,
)
async def delete_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> None:
    """Delete a finished job: its record, events, logs and checkpoint."""
    await store.get(job_id)
    await store.delete(job_id)
    paths = (
        checkpoint.path_for(settings.work_dir, job_id),
        checkpoint.best_path_for(settings.work_dir, job_id),
    )
    for path in paths:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    # The job's unpacked code; the zip stays, by digest, for other jobs that name it.
    await asyncio.to_thread(
        shutil.rmtree, job_code_dir(settings.work_dir, job_id), ignore_errors=True
    )
    with contextlib.suppress(Exception):  # gone already when the job finished
        await store.redis.xgroup_destroy(settings.bus.stream("control"), control_group(job_id))


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses=_ERRORS)
async def job_logs(
    job_id: JobId, store: StoreDep, tail: Annotated[int | None, Query(ge=1, le=100_000)] = None
) -> PlainTextResponse:
    await store.get(job_id)
    lines = await store.logs(job_id, tail)
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""))


@router.get(
    "/{job_id}/checkpoint",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
)
async def job_checkpoint(
    job_id: JobId,
    store: StoreDep,
    settings: SettingsDep,
    which: Annotated[Literal["last", "best"], Query()] = "last",
) -> FileResponse:
    """The last checkpoint, or with `which=best` the weights of the best validation epoch
    (`training.keep_best`; its `epoch` and `val_accuracy` say which). Either loads with
    `torch.load(..., weights_only=True)`: `model` is the wrapped model's state_dict, `spec` the
    job's spec."""
    await store.get(job_id)
    if which == "best":
        path = checkpoint.best_path_for(settings.work_dir, job_id)
        missing = f"job {job_id} has no best epoch's weights yet (or training.keep_best is off)"
    else:
        path = checkpoint.path_for(settings.work_dir, job_id)
        missing = f"job {job_id} has no checkpoint yet"
    if not path.exists():
        raise ApiError(404, "no_checkpoint", missing, ["path", "job_id"])
    suffix = "-best" if which == "best" else ""
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{job_id}{suffix}.pt"
    )


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS, **error_responses(400)},
)
async def job_events(
    job_id: JobId, store: StoreDep, settings: SettingsDep, request: Request
) -> StreamingResponse:
    """Server-sent events: every event of the job so far, then live ones, until it ends.
    Each has `id` (resume with `Last-Event-ID`), `event` (the message type) and `data` (the
    envelope JSON): epochs (`telemetry.report`), seed transitions, decisions, status changes."""
    start = request.headers.get("last-event-id") or "0"
    # Checked before the stream starts: once it has, a bad id could only break it mid-way.
    if not _STREAM_ID.fullmatch(start) or any(int(p) >= 1 << 64 for p in start.split("-")):
        raise ApiError(
            400,
            "bad_request",
            f"Last-Event-ID must be the id of an event of this stream, not {start[:100]!r}",
            ["header", "last-event-id"],
        )
    await store.get(job_id)
    return StreamingResponse(
        _event_stream(store, job_id, start, request, settings.bus.block_ms),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    store: StoreDep, job_id: str, last_id: str, request: Request, block_ms: int
) -> AsyncIterator[bytes]:
    key = store.events_key(job_id)
    idle_since = asyncio.get_running_loop().time()
    while not await request.is_disconnected():
        # The bus's block time: its settings keep it below the client's socket timeout.
        batches: Any = await store.redis.xread({key: last_id}, count=100, block=block_ms)
        for _, entries in batches or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                raw: bytes = fields[FIELD]
                kind = json.loads(raw).get("type", "message")
                yield f"id: {last_id}\nevent: {kind}\ndata: {raw.decode()}\n\n".encode()
            idle_since = asyncio.get_running_loop().time()
        if not batches:
            try:
                view = await store.get(job_id)
            except UnknownJobError:
                return
            if view.status in TERMINAL_JOB_STATUSES:
                end = json.dumps({"job_id": job_id, "status": view.status})
                yield f"event: end\ndata: {end}\n\n".encode()
                return
            if asyncio.get_running_loop().time() - idle_since > 15:
                idle_since = asyncio.get_running_loop().time()
                yield b": keep-alive\n\n"

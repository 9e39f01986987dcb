"""Job records in Redis, shared by every Tolaria replica and the job processes.

    {prefix}:job:{id}              the JobView, as JSON
    {prefix}:job-index             sorted set of job ids by creation time (listing, newest first)
    {prefix}:job-submission:{sid}  the job a client submission id created (idempotent submit)
    {prefix}:job:{id}:stop         set when a stop was requested
    {prefix}:job:{id}:events       stream of the job's envelopes (replayed by the SSE route)
    {prefix}:job:{id}:logs         list of the job's log lines (capped)

Every change of a record is a compare-and-set (WATCH/MULTI), so an API replica stopping a job and
the job's own process finishing it cannot overwrite each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from esper.bus.producer import FIELD
from esper.contracts import TERMINAL_JOB_STATUSES, Envelope, JobSpec, JobStatus, JobView


class UnknownJobError(LookupError):
    pass


class JobStateError(RuntimeError):
    """The job's status does not allow the change (delete a running job, ...)."""


class JobStore:
    def __init__(self, redis: aioredis.Redis, prefix: str, *, max_events: int, max_log_lines: int):
        self.redis = redis
        self.prefix = prefix
        self.max_events = max_events
        self.max_log_lines = max_log_lines

    # ------------------------------------------------------------------ keys
    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:events"

    def logs_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:logs"

    def stop_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:stop"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:job-index"

    def submission_key(self, submission_id: str) -> str:
        return f"{self.prefix}:job-submission:{submission_id}"

    # --------------------------------------------------------------- records
    async def create(self, job_id: str, spec: JobSpec) -> tuple[JobView, bool]:
        """Store a PENDING job; with a submission id seen before, the existing job instead."""
        if spec.submission_id is not None:
            claimed = await self.redis.set(self.submission_key(spec.submission_id), job_id, nx=True)
            if not claimed:
                existing = await self.redis.get(self.submission_key(spec.submission_id))
                if existing is not None:
                    return await self.get(_text(existing)), False
        view = JobView(
            job_id=job_id,
            submission_id=spec.submission_id,
            name=spec.name,
            status="PENDING",
            created_at=time.time(),
            spec=spec,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(job_id), view.model_dump_json())
            pipe.zadd(self.index_key, {job_id: view.created_at})
            await pipe.execute()
        return view, True

    async def get(self, job_id: str) -> JobView:
        raw = await self.redis.get(self.key(job_id))
        if raw is None:
            raise UnknownJobError(f"no job {job_id!r}")
        return JobView.model_validate_json(raw)

    async def update(self, job_id: str, change: Callable[[JobView], JobView | None]) -> JobView:
        """Apply `change` atomically; it returns the new view, or None to leave it as it is.
        It may raise JobStateError to refuse; it runs again if the record changed meanwhile."""
        key = self.key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise UnknownJobError(f"no job {job_id!r}")
                    current = JobView.model_validate_json(raw)
                    updated = change(current)
                    if updated is None:
                        await pipe.unwatch()
                        return current
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json())
                    await pipe.execute()
                    return updated
                except WatchError:
                    continue

    async def set_fields(self, job_id: str, **fields: Any) -> JobView:
        return await self.update(job_id, lambda view: view.model_copy(update=fields))

    async def page(
        self, *, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobView], str | None]:
        """Newest first. The cursor is the position after the last job returned."""
        start = int(cursor) if cursor else 0
        views: list[JobView] = []
        position = start
        chunk = max(limit, 100)
        while len(views) < limit:
            ids = await self.redis.zrevrange(self.index_key, position, position + chunk - 1)
            if not ids:
                return views, None
            raws = await self.redis.mget(
                [self.key(_text(i)) for i in ids if isinstance(i, (bytes, str))]
            )
            for raw in raws:
                position += 1
                if raw is None:
                    continue
                view = JobView.model_validate_json(raw)
                if status is None or view.status == status:
                    views.append(view)
                    if len(views) == limit:
                        break
        more = await self.redis.zcard(self.index_key) > position
        return views, str(position) if more else None

    async def delete(self, job_id: str) -> None:
        view = await self.get(job_id)
        if view.status not in TERMINAL_JOB_STATUSES:
            raise JobStateError(f"job {job_id} is {view.status}; stop it before deleting it")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                self.key(job_id),
                self.events_key(job_id),
                self.logs_key(job_id),
                self.stop_key(job_id),
            )
            pipe.zrem(self.index_key, job_id)
            if view.submission_id:
                pipe.delete(self.submission_key(view.submission_id))
            await pipe.execute()

    # ------------------------------------------------------------------ stop
    async def request_stop(self, job_id: str) -> JobView:
        """PENDING → STOPPED at once; RUNNING: flag it, and its process stops within a step."""

        def stop(view: JobView) -> JobView | None:
            if view.status in TERMINAL_JOB_STATUSES:
                return None
            if view.status == "PENDING":
                return view.model_copy(
                    update={
                        "status": "STOPPED",
                        "stop_requested": True,
                        "finished_at": time.time(),
                        "error": "stopped before it started",
                    }
                )
            return view.model_copy(update={"stop_requested": True})

        await self.redis.set(self.stop_key(job_id), b"1")
        return await self.update(job_id, stop)

    async def stop_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.stop_key(job_id)))

    # ---------------------------------------------------------- events, logs
    async def append_event(self, job_id: str, envelope: Envelope) -> None:
        await self.redis.xadd(
            self.events_key(job_id),
            {FIELD: envelope.encode()},
            maxlen=self.max_events,
            approximate=True,
        )

    async def append_logs(self, job_id: str, lines: list[str]) -> None:
        if not lines:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.logs_key(job_id), *lines)
            pipe.ltrim(self.logs_key(job_id), -self.max_log_lines, -1)
            await pipe.execute()

    async def logs(self, job_id: str, tail: int | None = None) -> list[str]:
        start = -tail if tail else 0
        lines = await self.redis.lrange(self.logs_key(job_id), start, -1)
        return [_text(line) for line in lines]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

"""Job records in Redis, shared by every Tolaria replica and the job processes.

    {prefix}:job:{id}              the JobView, as JSON
    {prefix}:job-index             sorted set of job ids by creation time (listing, newest first)
    {prefix}:job-submission:{sid}  the job a client submission id created (idempotent submit)
    {prefix}:job:{id}:stop         set when a stop was requested
    {prefix}:job:{id}:events       stream of the job's envelopes (replayed by the SSE route)
    {prefix}:job:{id}:logs         list of the job's log lines (capped)
    {prefix}:job:{id}:logs-batch   id of the last batch of lines appended (a resend is skipped)

Every change of a record is a compare-and-set (WATCH/MULTI), so an API replica stopping a job and
the job's own process finishing it cannot overwrite each other. Appending an event or a batch of
log lines is idempotent: after a lost connection the writer sends the same thing again, and a
copy that had arrived before the connection broke is not added twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from esper.bus import BusSettings
from esper.bus.connection import CONNECTION_ERRORS, Backoff
from esper.bus.producer import FIELD
from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    ControlDecision,
    Envelope,
    JobSpec,
    JobStatus,
    JobView,
)
from esper.exceptions import BusError

log = logging.getLogger("tolaria.jobstore")
T = TypeVar("T")
OUTAGES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, BusError)
"""What a Redis write fails with while the server is away (BusError: a producer gave up)."""

# The same envelope twice in a row is a resend (every envelope has its own id and time).
_APPEND_EVENT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] ~= nil and last[1][2][2] == ARGV[1] then return last[1][1] end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', ARGV[3], ARGV[1])
"""
_APPEND_LOGS = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('SET', KEYS[2], ARGV[1])
return #ARGV - 2
"""
LOG_BATCH = 500
"""Lines per script call: a script's arguments live on Lua's stack, which is bounded."""


async def retrying(
    op: Callable[[], Awaitable[T]], bus: BusSettings, what: str, timeout_s: float | None = None
) -> T:
    """`op()`, again on the bus's backoff while Redis is away, for up to `timeout_s` (the bus's
    `retry_timeout_s` by default); then the last error. `op` must be safe to repeat."""
    deadline = time.monotonic() + (bus.retry_timeout_s if timeout_s is None else timeout_s)
    backoff = Backoff.from_settings(bus)
    while True:
        try:
            result = await op()
        except OUTAGES as err:
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise
            if backoff.attempts == 1:
                kind = type(err).__name__
                log.warning("%s: Redis unreachable (%s: %s); retrying", what, kind, err)
            await asyncio.sleep(delay)
        else:
            if backoff.attempts:
                log.info("%s: done after %d retries", what, backoff.attempts)
            return result


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
        # Scripts run by digest and are loaded again by redis-py after a Redis restart.
        self._append_event = redis.register_script(_APPEND_EVENT)
        self._append_logs = redis.register_script(_APPEND_LOGS)

    # ------------------------------------------------------------------ keys
    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:events"

    def logs_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:logs"

    def logs_batch_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:logs-batch"

    def stop_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:stop"

    def inbox_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:inbox"

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
                self.logs_batch_key(job_id),
                self.stop_key(job_id),
                self.inbox_key(job_id),
            )
            pipe.zrem(self.index_key, job_id)
            if view.submission_id:
                pipe.delete(self.submission_key(view.submission_id))
            await pipe.execute()

    # ----------------------------------------------------------------- inbox
    # Operators' decisions wait here for the job's next decision point: their bus messages are
    # acked on arrival (a handler may not wait an epoch), so this list is what keeps them
    # through a crash of the job's process until a checkpoint holds their effect.
    async def hold_decision(self, job_id: str, decision: ControlDecision) -> None:
        await self.redis.rpush(self.inbox_key(job_id), decision.model_dump_json())

    async def held_decisions(self, job_id: str) -> list[ControlDecision]:
        raw = await self.redis.lrange(self.inbox_key(job_id), 0, -1)
        return [ControlDecision.model_validate_json(item) for item in raw]

    async def release_decisions(self, job_id: str, decisions: list[ControlDecision]) -> None:
        if not decisions:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for decision in decisions:
                pipe.lrem(self.inbox_key(job_id), 0, decision.model_dump_json())
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
        """Append to the job's event stream, unless it is the stream's last entry already."""
        await self._append_event(
            keys=[self.events_key(job_id)], args=[envelope.encode(), self.max_events, FIELD]
        )

    async def append_logs(self, job_id: str, lines: list[str], batch_id: str | None = None) -> None:
        """Append lines; a batch sent again with the same `batch_id` (at most LOG_BATCH lines,
        sent in order) is appended once."""
        if not lines:
            return
        if len(lines) > LOG_BATCH:
            if batch_id is not None:
                raise ValueError(f"a batch with an id holds at most {LOG_BATCH} lines")
            for start in range(0, len(lines), LOG_BATCH):
                await self.append_logs(job_id, lines[start : start + LOG_BATCH])
            return
        await self._append_logs(
            keys=[self.logs_key(job_id), self.logs_batch_key(job_id)],
            args=[batch_id or uuid.uuid4().hex, self.max_log_lines, *lines],
        )

    async def logs(self, job_id: str, tail: int | None = None) -> list[str]:
        start = -tail if tail else 0
        lines = await self.redis.lrange(self.logs_key(job_id), start, -1)
        return [_text(line) for line in lines]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

"""Workers: consume the job queue as one group across every Tolaria replica, and run each job in
its own process (`python -m tolaria.runner`), so training never blocks the API.

A worker holds a job's queue entry for as long as its process runs; the bus consumer keeps the
entry's claim fresh. If this replica dies, the entry goes idle and another replica's worker
claims it after `job_claim_idle_ms` and starts the job again, which resumes from its checkpoint.

A job process that crashes (killed, out of memory) is started again from the checkpoint, after a
backoff, up to the spec's `training.max_restarts` times — as Ray's `FailureConfig.max_failures`
and torchrun's `--max-restarts` do; then the job ends FAILED, each attempt's exit in its view.
A job a user asked to stop is not started again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid

from esper._backoff import Backoff
from esper.bus import BusSettings, Consumer, Delivery
from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    Envelope,
    JobAttempt,
    JobQueued,
    JobStatus,
    JobStatusChanged,
    JobView,
)
from tolaria.jobstore import JobStore, retrying
from tolaria.runner import ORPHANED, OUTAGE, RAY_AWAY
from tolaria.settings import TolariaSettings

log = logging.getLogger("tolaria.worker")
GROUP = "tolaria-workers"
RESTART_BACKOFF = Backoff(0.5, 30.0, floor_s=0.5)
"""The pause before a crashed job's next attempt: a process that dies at once does not spin."""


def exit_reason(code: int) -> str:
    """What a job process's exit code says, for its attempt in the job view."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory, or killed by an operator?)" if -code == signal.SIGKILL else ""
        return f"the job process was killed by {name}{why}"
    if code == RAY_AWAY:
        return "the job process could not reach the Ray cluster"
    if code == OUTAGE:
        return "the job process gave up waiting for Redis"
    return f"the job process exited with code {code}"


def crashes(view: JobView) -> int:
    """Attempts whose process crashed (a worker lost with its job is not the job's fault)."""
    return sum(1 for a in view.attempts if a.exit_code is not None and a.exit_code != 0)


def queue_settings(settings: TolariaSettings) -> BusSettings:
    """A job can train for hours: no handler timeout, one job per read, and a claim timeout of
    its own (a dead worker's job is taken over after `job_claim_idle_ms`)."""
    return settings.bus.model_copy(
        update={
            "handler_timeout_s": None,
            "read_count": 1,
            "claim_idle_ms": settings.job_claim_idle_ms,
            "max_deliveries": 10,
        }
    )


class Worker:
    def __init__(self, settings: TolariaSettings, store: JobStore, index: int) -> None:
        self.settings = settings
        self.store = store
        self.consumer = Consumer(
            GROUP,
            ["jobs"],
            settings=queue_settings(settings),
            name=f"{settings.instance}-w{index}",
        )
        self.consumer.register(JobQueued, self.run_job)
        self.current: str | None = None
        self.pid: int | None = None
        """The process of the current job's attempt."""

    def start(self) -> None:
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop(timeout=5)
        await self.consumer.close()

    async def run_job(self, delivery: Delivery) -> None:
        message = delivery.message
        assert isinstance(message, JobQueued)
        job_id = message.job_id
        view = await self.store.get(job_id)
        if view.status in TERMINAL_JOB_STATUSES:
            return
        self.current = job_id
        log.info("starting job %s (delivery %d)", job_id, delivery.attempt)
        try:
            restarts = 0
            while True:
                started = time.time()
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tolaria.runner", job_id
                )
                self.pid = process.pid
                try:
                    code = await process.wait()
                except asyncio.CancelledError:
                    # This replica is shutting down: end the job's process; the entry stays
                    # pending and another worker resumes the job from its checkpoint.
                    process.terminate()
                    raise
                if code == ORPHANED:
                    raise RuntimeError(
                        f"job {job_id} was orphaned; leaving it pending for another worker"
                    )
                if code == 0:
                    return
                if not await self.record_crash(job_id, process.pid, code, started):
                    return
                await asyncio.sleep(RESTART_BACKOFF.delay(restarts))
                restarts += 1
        finally:
            self.current = None
            self.pid = None

    async def record_crash(self, job_id: str, pid: int, code: int, started: float) -> bool:
        """Record a crashed attempt; whether the job is to be started again."""
        reason = exit_reason(code)
        now = time.time()
        log.error("job %s: %s", job_id, reason)

        def crashed(view: JobView) -> JobView | None:
            if view.status in TERMINAL_JOB_STATUSES:
                return None
            attempts = list(view.attempts)
            update: dict[str, object] = {}
            ended = {"ended_at": now, "exit_code": code, "reason": reason}
            if attempts and attempts[-1].pid == pid and attempts[-1].ended_at is None:
                attempts[-1] = attempts[-1].model_copy(update=ended)
            elif not any(a.pid == pid and a.exit_code == code for a in attempts):
                # It died before it could say it had begun: count it all the same.
                number = view.attempt + 1
                update["attempt"] = number
                attempts.append(
                    JobAttempt(
                        attempt=min(number, 1000),
                        worker=self.settings.instance,
                        pid=pid,
                        started_at=started,
                        ended_at=now,
                        exit_code=code,
                        reason=reason,
                    )
                )
            update["attempts"] = attempts[-100:]
            view = view.model_copy(update=update)
            allowed = view.spec.training.max_restarts
            status: JobStatus | None = None
            if view.stop_requested:
                status, error = "STOPPED", f"stopped on request; {reason}"
            elif crashes(view) > allowed:
                status = "FAILED"
                error = f"{reason}; no restarts left (training.max_restarts: {allowed})"
            if status is None:
                return view
            return view.model_copy(update={"status": status, "error": error, "finished_at": now})

        view = await retrying(
            lambda: self.store.update(job_id, crashed), self.settings.bus, f"record {job_id}"
        )
        if view.status not in TERMINAL_JOB_STATUSES:
            allowed = view.spec.training.max_restarts
            line = (
                f"worker: {reason}; starting it again from its checkpoint "
                f"(restart {crashes(view)} of at most {allowed})"
            )
            batch = uuid.uuid4().hex  # one id for every resend: the line lands once
            await retrying(
                lambda: self.store.append_logs(job_id, [line], batch_id=batch),
                self.settings.bus,
                "log",
            )
            return True
        if view.finished_at == now:  # this worker ended it
            now_id = uuid.uuid4().hex
            await retrying(
                lambda: self.store.append_logs(job_id, [f"worker: {view.error}"], batch_id=now_id),
                self.settings.bus,
                "log",
            )
            # With whatever the crashed attempts measured, as the job view shows it.
            envelope = Envelope.wrap(JobStatusChanged.ended(view), source="tolaria")
            await retrying(
                lambda: self.store.append_event(job_id, envelope), self.settings.bus, "event"
            )
        return False

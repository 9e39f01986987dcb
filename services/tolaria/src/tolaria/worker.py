"""Workers: consume the job queue as one group across every Tolaria replica, and run each job in
its own process (`python -m tolaria.runner`), so training never blocks the API.

A worker holds a job's queue entry for as long as its process runs; the bus consumer keeps the
entry's claim fresh. If this replica dies, the entry goes idle and another replica's worker
claims it after `job_claim_idle_ms` and starts the job again, which resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from esper.bus import BusSettings, Consumer, Delivery
from esper.contracts import TERMINAL_JOB_STATUSES, Envelope, JobQueued, JobStatusChanged, JobView
from tolaria.jobstore import JobStore
from tolaria.runner import ORPHANED
from tolaria.settings import TolariaSettings

log = logging.getLogger("tolaria.worker")
GROUP = "tolaria-workers"


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
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tolaria.runner", job_id
        )
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            # This replica is shutting down: end the job's process; the entry stays pending and
            # another worker resumes the job from its checkpoint.
            process.terminate()
            raise
        finally:
            self.current = None
        if code == ORPHANED:
            raise RuntimeError(f"job {job_id} was orphaned; leaving it pending for another worker")
        if code != 0:
            await self.record_crash(job_id, code)

    async def record_crash(self, job_id: str, code: int) -> None:
        reason = f"the job process exited with code {code} (killed, or out of memory?)"
        log.error("job %s: %s", job_id, reason)

        def fail(view: JobView) -> JobView | None:
            if view.status in TERMINAL_JOB_STATUSES:
                return None
            return view.model_copy(
                update={"status": "FAILED", "error": reason, "finished_at": time.time()}
            )

        view = await self.store.update(job_id, fail)
        if view.status == "FAILED":
            await self.store.append_logs(job_id, [f"worker: {reason}"])
            envelope = Envelope.wrap(
                JobStatusChanged(
                    job_id=job_id,
                    status="FAILED",
                    previous="RUNNING",
                    error=reason,
                    attempt=max(1, view.attempt),
                ),
                source="tolaria",
            )
            await self.store.append_event(job_id, envelope)

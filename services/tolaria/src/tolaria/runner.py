"""`python -m tolaria.runner JOB_ID`: one job in its own process, started by a Tolaria worker.

Exit codes: 0 the job ended (SUCCEEDED, FAILED or STOPPED, recorded in its record); 3 the worker
that started it died, so the job was left RUNNING for the worker that takes it over; anything
else is a crash (a kill, out of memory, Redis away longer than the bus's `retry_timeout_s`), which
the worker retries from the checkpoint up to `training.max_restarts` times.

An error the job's own code raises (a file that vanished, a NaN that breaks a layer) is not a
crash: the job ends FAILED at once, with the traceback in its logs. Such errors repeat on every
try, so retrying them would only spend the restarts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import torch

from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    JobAttempt,
    JobStatus,
    JobStatusChanged,
    JobView,
)
from esper.service.logs import configure_logging
from tolaria.jobstore import OUTAGES, JobStateError
from tolaria.rayexec import RayUnreachableError, run_on_ray
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer, StopRequested

log = logging.getLogger("tolaria.job")
ORPHANED = 3
OUTAGE = 4
"""Redis stayed away longer than the bus's bound: a crash, retried by the worker."""
RAY_AWAY = 5
"""The Ray cluster could not be reached: a crash, retried by the worker."""
WORKER_LOST = "its worker was lost; another worker took the job over"


class ShipToJobLog(logging.Handler):
    """Every log line of the job process also goes to the job's log (`GET /jobs/{id}/logs`)."""

    def __init__(self, runtime: JobRuntime) -> None:
        super().__init__(logging.INFO)
        self.runtime = runtime
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.runtime.log_line(self.format(record))
        except Exception:
            self.handleError(record)


def start_attempt(runtime: JobRuntime) -> JobView | None:
    """PENDING (or RUNNING, when taking over from a dead worker) → RUNNING with attempt + 1;
    None when the job has ended (stopped while queued, deleted)."""

    pid, now = os.getpid(), time.time()
    store, job_id = runtime.store, runtime.job_id

    def begin(view: JobView) -> JobView | None:
        if view.status in TERMINAL_JOB_STATUSES:
            raise JobStateError(view.status)
        if view.attempts and view.attempts[-1].pid == pid and view.attempts[-1].ended_at is None:
            return None  # begun already: a retry after the reply to the first write was lost
        attempts = list(view.attempts)
        if attempts and attempts[-1].ended_at is None:  # its process left no word: worker gone
            attempts[-1] = attempts[-1].model_copy(update={"ended_at": now, "reason": WORKER_LOST})
        number = view.attempt + 1
        attempts.append(
            JobAttempt(
                attempt=min(number, 1000), worker=runtime.settings.instance, pid=pid, started_at=now
            )
        )
        return view.model_copy(
            update={
                "status": "RUNNING",
                "attempt": number,
                "worker": runtime.settings.instance,
                "started_at": view.started_at or now,
                "attempts": attempts[-100:],
            }
        )

    try:
        before = runtime.reliably(lambda: store.get(job_id), "read the job")
        view = runtime.reliably(lambda: store.update(job_id, begin), "start the attempt")
    except (JobStateError, LookupError) as err:
        log.info("job %s not started: %s", runtime.job_id, err)
        return None
    # A worker taking over a job another worker left RUNNING: no change of status to report,
    # only a new attempt (previous=None).
    previous = None if before.status == "RUNNING" else before.status
    runtime.emit(
        JobStatusChanged(
            job_id=view.job_id, status="RUNNING", previous=previous, attempt=view.attempt
        )
    )
    return view


def finish(runtime: JobRuntime, status: JobStatus, error: str | None, **fields: object) -> None:
    """Record the end, after everything the job wrote before it: who waits for the status
    finds every epoch's events and log lines in place."""
    runtime.flush()
    runtime.call(runtime.drop_control_group())
    now, pid = time.time(), os.getpid()
    reason = status if error is None else f"{status}: {error}"

    def end(view: JobView) -> JobView:
        attempts = list(view.attempts)
        if attempts and attempts[-1].pid == pid:
            attempts[-1] = attempts[-1].model_copy(
                update={"ended_at": now, "exit_code": 0, "reason": reason[:2000]}
            )
        return view.model_copy(
            update={
                "status": status,
                "error": error,
                "finished_at": now,
                "attempts": attempts,
                **fields,
            }
        )

    view = runtime.reliably(lambda: runtime.store.update(runtime.job_id, end), "finish the job")
    # From the record as written, so the event's final metrics are the job view's.
    runtime.emit(JobStatusChanged.ended(view))


def main(job_id: str) -> int:
    settings = TolariaSettings()
    configure_logging("tolaria-job", f"{job_id}"[:128], settings.log_level, settings.log_json)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # On Ray, rank 0 reads the job's control group: this process must leave it alone.
    on_ray = settings.executor == "ray"
    runtime = JobRuntime(settings, job_id, consume_control=not on_ray).start()
    logging.getLogger().addHandler(ShipToJobLog(runtime))
    try:
        view = start_attempt(runtime)
        if view is None:
            return 0
        log.info("job %s attempt %d on %s", job_id, view.attempt, settings.instance)
        if on_ray:
            return drive_ray_run(runtime, view)
        try:
            trainer = JobTrainer(runtime, view.spec, settings.data_dir, settings.work_dir)
            if trainer.resume():
                # The last attempt may have died between its checkpoint and its record's
                # update: the record catches up with the checkpoint before training goes on.
                trainer.record_progress()
            trainer.run()
        except StopRequested:
            if runtime.orphaned.is_set():
                log.warning("the worker that started this job is gone; leaving it to another")
                return ORPHANED
            log.info("stop requested: stopped at step %d", trainer.progress.step)
            finish(runtime, "STOPPED", "stopped on request", seeds=trainer.seed_views())
            return 0
        except OUTAGES as err:
            log.error("Redis unreachable for too long (%s); leaving the job to a restart", err)
            return OUTAGE
        except Exception as err:
            return failed(runtime, err)
        finish(
            runtime,
            "SUCCEEDED",
            None,
            metrics=trainer.metrics,
            progress=trainer.view_progress(),
            seeds=trainer.seed_views(),
        )
        log.info("job %s succeeded: %s", job_id, trainer.metrics.model_dump(exclude_none=True))
        return 0
    finally:
        runtime.close()


def failed(runtime: JobRuntime, err: Exception) -> int:
    """An error of the job's own (not a crash): FAILED at once, the traceback in its log."""
    log.error("job failed:\n%s", traceback.format_exc())
    finish(runtime, "FAILED", f"{type(err).__name__}: {err}"[:2000])
    return 0


def drive_ray_run(runtime: JobRuntime, view: JobView) -> int:
    """The job as a Ray Train run (tolaria.rayexec), ended with what its rank 0 reported."""
    workers = view.spec.distributed.workers
    log.info("job %s: a Ray Train run of %d worker(s)", view.job_id, workers)
    try:
        outcome = run_on_ray(runtime.settings, view.job_id, view.spec)
    except RayUnreachableError as err:
        log.error("%s; leaving the job to a restart", err)
        return RAY_AWAY
    except OUTAGES as err:
        log.error("Redis unreachable for too long (%s); leaving the job to a restart", err)
        return OUTAGE
    except Exception as err:
        return failed(runtime, err)
    if outcome.status == "STOPPED":
        log.info("stop requested: stopped at step %d", outcome.progress.step)
        finish(runtime, "STOPPED", "stopped on request", seeds=outcome.seeds)
        return 0
    finish(
        runtime,
        "SUCCEEDED",
        None,
        metrics=outcome.metrics,
        progress=outcome.progress,
        seeds=outcome.seeds,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tolaria.runner JOB_ID", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

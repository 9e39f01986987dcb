"""`python -m tolaria.runner JOB_ID`: one job in its own process, started by a Tolaria worker.

Exit codes: 0 the job ended (SUCCEEDED, FAILED or STOPPED, recorded in its record); 3 the worker
that started it died, so the job was left RUNNING for the worker that takes it over; anything
else is a crash the worker records as FAILED.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback

import torch

from esper.contracts import TERMINAL_JOB_STATUSES, JobStatus, JobStatusChanged, JobView
from esper.service.logs import configure_logging
from tolaria.jobstore import JobStateError
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer, StopRequested

log = logging.getLogger("tolaria.job")
ORPHANED = 3


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

    def begin(view: JobView) -> JobView:
        if view.status in TERMINAL_JOB_STATUSES:
            raise JobStateError(view.status)
        return view.model_copy(
            update={
                "status": "RUNNING",
                "attempt": view.attempt + 1,
                "worker": runtime.settings.instance,
                "started_at": view.started_at or time.time(),
            }
        )

    try:
        before = runtime.call(runtime.store.get(runtime.job_id))
        view = runtime.call(runtime.store.update(runtime.job_id, begin))
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
    runtime.call(runtime.drop_control_group())
    view = runtime.call(
        runtime.store.set_fields(
            runtime.job_id, status=status, error=error, finished_at=time.time(), **fields
        )
    )
    runtime.emit(
        JobStatusChanged(
            job_id=view.job_id,
            status=status,
            previous="RUNNING",
            error=error[:2000] if error else None,
            attempt=max(1, view.attempt),
        )
    )


def main(job_id: str) -> int:
    settings = TolariaSettings()
    configure_logging("tolaria-job", f"{job_id}"[:128], settings.log_level, settings.log_json)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runtime = JobRuntime(settings, job_id).start()
    logging.getLogger().addHandler(ShipToJobLog(runtime))
    try:
        view = start_attempt(runtime)
        if view is None:
            return 0
        log.info("job %s attempt %d on %s", job_id, view.attempt, settings.instance)
        try:
            trainer = JobTrainer(runtime, view.spec, settings.data_dir, settings.work_dir)
            trainer.resume()
            trainer.run()
        except StopRequested:
            if runtime.orphaned.is_set():
                log.warning("the worker that started this job is gone; leaving it to another")
                return ORPHANED
            log.info("stop requested: stopped at step %d", trainer.progress.step)
            finish(runtime, "STOPPED", "stopped on request", seeds=trainer.seed_views())
            return 0
        except Exception as err:
            log.error("job failed:\n%s", traceback.format_exc())
            finish(runtime, "FAILED", f"{type(err).__name__}: {err}"[:2000])
            return 0
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tolaria.runner JOB_ID", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

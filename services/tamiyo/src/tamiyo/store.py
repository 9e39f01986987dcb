"""Tamiyo's state in Redis, shared by every replica.

Keys (under the bus prefix, `esper` by default):

    {prefix}:tamiyo:job:{job_id}          the job's JobState as JSON (expires state_ttl_s after
                                          its last write)
    {prefix}:tamiyo:policy                the PUT policy as JSON (absent: each replica's defaults)
    {prefix}:tamiyo:decision:{id}         a DecisionRecord as JSON
    {prefix}:tamiyo:decisions             sorted set of decision ids by time (newest kept)
    {prefix}:tamiyo:decisions:{job_id}    the same, per job

`transact` is the only writer of a job's state: WATCH the key, read it (and the policy), let the
caller compute the new state and the decisions, then in one MULTI/EXEC write the state, XADD the
decisions to the control stream and record them. If another replica wrote the state meanwhile,
EXEC fails and the whole computation runs again on the fresh state. So two replicas never both
decide from the same state, and a state change and the decisions it implies are published
together or not at all: a redelivered message finds its effect already in the state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from esper.bus import FIELD, BusSettings
from esper.contracts import DecisionTaken, Envelope
from esper.policy.config import PolicyConfig
from esper.policy.models import JobState
from tamiyo.models import DecisionRecord, PolicyView

Redis = aioredis.Redis


@dataclass
class Change:
    """What one handling of a message produced: the new state and the decisions to publish."""

    state: JobState
    envelopes: list[Envelope] = field(default_factory=list)
    records: list[DecisionRecord] = field(default_factory=list)


Mutation = Callable[[JobState | None, PolicyConfig], Change | None]
"""Given the stored state (None: a job never seen) and the policy, the change to write; None
when nothing changes (a duplicate, say). Runs again if the state changed under it."""


class TamiyoStore:
    def __init__(
        self,
        redis: Redis,
        bus: BusSettings,
        defaults: PolicyConfig,
        *,
        state_ttl_s: int = 7 * 86_400,
        max_decisions: int = 10_000,
        max_job_decisions: int = 1_000,
    ) -> None:
        self.redis = redis
        self.bus = bus
        self.defaults = defaults
        self.state_ttl_s = state_ttl_s
        self.max_decisions = max_decisions
        self.max_job_decisions = max_job_decisions
        self.base = f"{bus.prefix}:tamiyo"
        self.control_stream = bus.stream("control")
        self.conflicts = 0
        """Transactions run again because another writer changed the state first."""
        self._policy_cache: tuple[bytes, PolicyView] | None = None

    # ------------------------------------------------------------------- keys
    def state_key(self, job_id: str) -> str:
        return f"{self.base}:job:{job_id}"

    @property
    def policy_key(self) -> str:
        return f"{self.base}:policy"

    def record_key(self, decision_id: str) -> str:
        return f"{self.base}:decision:{decision_id}"

    def index_key(self, job_id: str | None = None) -> str:
        return f"{self.base}:decisions" if job_id is None else f"{self.base}:decisions:{job_id}"

    # ----------------------------------------------------------------- policy
    async def policy(self) -> PolicyView:
        return self._policy_view(await self.redis.get(self.policy_key))

    def _policy_view(self, raw: bytes | str | None) -> PolicyView:
        if raw is None:
            return PolicyView(policy=self.defaults, source="defaults")
        if isinstance(raw, str):
            raw = raw.encode()
        cached = self._policy_cache
        if cached is not None and cached[0] == raw:
            return cached[1]  # parsed once per change, not once per message
        data = json.loads(raw)
        view = PolicyView(
            policy=PolicyConfig.model_validate(data["policy"]),
            source="stored",
            updated_at=data.get("updated_at"),
        )
        self._policy_cache = (raw, view)
        return view

    async def put_policy(self, policy: PolicyConfig) -> PolicyView:
        now = time.time()
        body = json.dumps({"policy": policy.model_dump(mode="json"), "updated_at": now})
        await self.redis.set(self.policy_key, body)
        return PolicyView(policy=policy, source="stored", updated_at=now)

    # ------------------------------------------------------------------ state
    async def state(self, job_id: str) -> JobState | None:
        raw = await self.redis.get(self.state_key(job_id))
        return None if raw is None else JobState.model_validate_json(raw)

    async def transact(self, job_id: str, mutate: Mutation) -> Change | None:
        key = self.state_key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw_state, raw_policy = await pipe.mget(key, self.policy_key)
                    before = None if raw_state is None else JobState.model_validate_json(raw_state)
                    version = before.version if before is not None else 0
                    change = mutate(before, self._policy_view(raw_policy).policy)
                    if change is None:
                        await pipe.reset()  # type: ignore[no-untyped-call, unused-ignore]
                        return None
                    change.state.version = version + 1
                    change.state.updated_at = time.time()
                    pipe.multi()  # type: ignore[no-untyped-call, unused-ignore]
                    self._write(pipe, job_id, change)
                    await pipe.execute()
                    return change
                except WatchError:
                    self.conflicts += 1

    def _write(self, pipe: aioredis.client.Pipeline, job_id: str, change: Change) -> None:
        pipe.set(self.state_key(job_id), change.state.model_dump_json(), ex=self.state_ttl_s)
        maxlen = self.bus.maxlen_for("control")
        for envelope in change.envelopes:
            entry = {FIELD: envelope.encode()}
            pipe.xadd(self.control_stream, entry, maxlen=maxlen, approximate=True)  # type: ignore[arg-type, unused-ignore]
        now_us = int(time.time() * 1_000_000)
        for offset, record in enumerate(change.records):
            decision_id = record.decision.decision_id
            score = now_us + offset  # distinct even within one transaction
            pipe.set(self.record_key(decision_id), record.model_dump_json(), ex=self.state_ttl_s)
            for index, keep in (
                (self.index_key(), self.max_decisions),
                (self.index_key(job_id), self.max_job_decisions),
            ):
                pipe.zadd(index, {decision_id: score})
                pipe.zremrangebyrank(index, 0, -keep - 1)

    # -------------------------------------------------------------- decisions
    async def decision(self, decision_id: str) -> DecisionRecord | None:
        raw = await self.redis.get(self.record_key(decision_id))
        return None if raw is None else DecisionRecord.model_validate_json(raw)

    async def decisions(
        self, job_id: str | None, limit: int, before: int | None = None
    ) -> tuple[list[DecisionRecord], int | None]:
        """Newest first; `before` (exclusive) is the cursor a previous page returned."""
        high: str = f"({before}" if before is not None else "+inf"
        rows = await self.redis.zrevrangebyscore(
            self.index_key(job_id), high, "-inf", start=0, num=limit + 1, withscores=True
        )
        page = [(_text(member), score) for member, score in cast(list[Any], rows)[:limit]]
        keys = [self.record_key(member) for member, _ in page]
        raws = await self.redis.mget(keys) if keys else []
        # A record whose key expired is skipped: the index outlives it until trimmed.
        records = [DecisionRecord.model_validate_json(r) for r in raws if r is not None]
        next_cursor = int(page[-1][1]) if len(rows) > limit else None
        return records, next_cursor

    async def record_outcome(self, taken: DecisionTaken) -> bool:
        """Write the job's answer into the decision's record (once: a duplicate changes nothing)."""
        record = await self.decision(taken.decision_id)
        if record is None or record.outcome != "published":
            return False
        record.outcome = taken.outcome
        record.outcome_reason = taken.reason
        record.slot = taken.seed
        await self.redis.set(
            self.record_key(taken.decision_id), record.model_dump_json(), keepttl=True
        )
        return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

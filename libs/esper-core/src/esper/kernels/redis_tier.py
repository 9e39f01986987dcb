"""RedisKernelTier: artifact bytes shared through Redis, the L2 between memory and Urza."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from esper.contracts.kernels import KernelMeta
from esper.exceptions import ConfigError, DigestMismatchError
from esper.kernels._loops import PerLoop
from esper.kernels.artifact import KernelArtifact, verify
from esper.kernels.cache import KernelSource

log = logging.getLogger(__name__)

# Above this, hashing for the digest check moves off the event loop.
_HASH_OFF_LOOP_BYTES = 1 << 20


@dataclass
class RedisTierStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    corrupt: int = 0  # entries unreadable or not matching their digest: deleted, not misses


class RedisKernelTier(KernelSource):
    """One hash per kernel, `{prefix}kernel:{id}` = {meta: KernelMeta JSON, data: bytes}, expiring
    `ttl_s` after it was last written or read.

    Only ids are looked up here: names and tags belong to Urza. A corrupt entry is deleted and
    reported as a miss, so the next tier serves the kernel and the cache writes a good copy back.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "esper:",
        ttl_s: int = 24 * 3600,
        max_artifact_bytes: int = 64 << 20,
        socket_timeout_s: float = 2.0,
    ) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if max_artifact_bytes < 0:
            raise ConfigError(f"max_artifact_bytes must be >= 0, got {max_artifact_bytes}")
        if socket_timeout_s <= 0:
            raise ConfigError(f"socket_timeout_s must be > 0, got {socket_timeout_s}")
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_artifact_bytes = max_artifact_bytes
        self.socket_timeout_s = socket_timeout_s
        self._stats = RedisTierStats()
        self._clients: PerLoop[aioredis.Redis] = PerLoop(self._connect, _close_redis)

    def _connect(self) -> aioredis.Redis:
        # No hidden retries: an unreachable Redis must fail fast so the cache asks the next tier.
        client: aioredis.Redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        return client

    def key(self, kernel_id: str) -> str:
        return f"{self.prefix}kernel:{kernel_id}"

    async def resolve(self, ref: str) -> str | None:
        return None

    async def fetch(self, kernel_id: str) -> KernelArtifact | None:
        key = self.key(kernel_id)
        client = await self._clients.get()
        async with client.pipeline(transaction=False) as pipe:
            pipe.hmget(key, ["meta", "data"])
            pipe.expire(key, self.ttl_s)
            (raw_meta, data), _ = await pipe.execute()
        if raw_meta is None and data is None:
            self._stats.misses += 1
            return None
        decoded = _decode(kernel_id, raw_meta, data)
        if isinstance(decoded, KernelArtifact):
            try:
                if len(decoded.data) > _HASH_OFF_LOOP_BYTES:
                    await asyncio.to_thread(verify, decoded)
                else:
                    verify(decoded)
            except DigestMismatchError as err:
                # The cache would refuse it too, but the bad copy would stay here for everyone.
                decoded = str(err)
            else:
                self._stats.hits += 1
                return decoded
        # A plain DEL can race a concurrent good write-back; that costs one extra miss, no more.
        await client.delete(key)
        self._stats.corrupt += 1
        log.warning("redis tier: deleted corrupt entry %s: %s", key, decoded)
        return None

    async def store(self, artifact: KernelArtifact) -> None:
        if len(artifact.data) > self.max_artifact_bytes:
            log.debug(
                "redis tier: not keeping %s (%d bytes > max_artifact_bytes %d)",
                artifact.meta.kernel_id,
                len(artifact.data),
                self.max_artifact_bytes,
            )
            return
        key = self.key(artifact.meta.kernel_id)
        client = await self._clients.get()
        # MULTI/EXEC: a reader sees the old entry, no entry, or the whole new one, never a half.
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"meta": artifact.meta.model_dump_json(), "data": artifact.data})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        self._stats.stores += 1

    async def aclose(self) -> None:
        await self._clients.aclose()

    def stats(self) -> dict[str, int]:
        return dict(vars(self._stats))


def _decode(kernel_id: str, raw_meta: bytes | None, data: bytes | None) -> KernelArtifact | str:
    """The artifact an entry holds, or why it is corrupt."""
    if raw_meta is None or data is None:
        return "it has no meta or no data field"
    try:
        meta = KernelMeta.model_validate_json(raw_meta)
    except ValidationError as err:
        return f"its meta is not a KernelMeta ({err.error_count()} errors)"
    if meta.kernel_id != kernel_id:
        return f"it holds kernel {meta.kernel_id}"
    return KernelArtifact(meta, data)


async def _close_redis(client: aioredis.Redis) -> None:
    await client.aclose()

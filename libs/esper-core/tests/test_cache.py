"""KernelCache: memory LRU bounded in bytes, tiers behind it, per-tier counts, coalesced fetches,
verification before anything is deserialized or cached, write-back, and the sync entry point.

The tiers are `Tier`, a KernelSource test double that serves artifacts from a dict, counts its
calls, can fail, and can hold a fetch open until the test releases it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from esper.blueprints import compile_blueprint
from esper.contracts import HostSignature
from esper.exceptions import (
    ArtifactError,
    CorruptArtifactError,
    DigestMismatchError,
    KernelFetchError,
    SignatureMismatchError,
    UnknownKernelError,
)
from esper.kernels import CachedKernel, KernelArtifact, KernelCache, KernelSource, digest_of
from esper.kernels.artifact import kernel_id_for

KEY = b"cache-key"


class Tier(KernelSource):
    def __init__(
        self,
        name: str,
        artifacts: Sequence[KernelArtifact] = (),
        tags: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.artifacts = {a.meta.kernel_id: a for a in artifacts}
        self.tags = dict(tags or {})
        self.fetches: Counter[str] = Counter()
        self.resolves = 0
        self.stored: list[KernelArtifact] = []
        self.fetch_error: BaseException | None = None
        self.resolve_error: BaseException | None = None
        self.gate: asyncio.Event | None = None  # when set up, fetch waits for it
        self.entered: asyncio.Event | None = None  # set when a fetch starts

    def hold(self) -> None:
        self.gate, self.entered = asyncio.Event(), asyncio.Event()

    async def resolve(self, ref: str) -> str | None:
        self.resolves += 1
        if self.resolve_error is not None:
            raise self.resolve_error
        kernel_id = self.tags.get(ref, ref)
        return kernel_id if kernel_id in self.artifacts else None

    async def fetch(self, kernel_id: str) -> KernelArtifact | None:
        self.fetches[kernel_id] += 1
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fetch_error is not None:
            raise self.fetch_error
        return self.artifacts.get(kernel_id)

    async def store(self, artifact: KernelArtifact) -> None:
        self.stored.append(artifact)
        self.artifacts[artifact.meta.kernel_id] = artifact


@pytest.fixture(scope="module")
def kernels() -> list[KernelArtifact]:
    """Three small TorchScript kernels of different sizes (fast to load)."""
    hosts = [(8, 8), (8, 16), (16, 32)]
    return [
        compile_blueprint(
            "low_rank", HostSignature(kind="linear", in_features=i, out_features=o), "torchscript"
        )
        for i, o in hosts
    ]


@pytest.fixture
def a(kernels: list[KernelArtifact]) -> KernelArtifact:
    return kernels[0]


def kid(artifact: KernelArtifact) -> str:
    return artifact.meta.kernel_id


def flipped(artifact: KernelArtifact) -> KernelArtifact:
    data = bytearray(artifact.data)
    data[len(data) // 2] ^= 0xFF
    return KernelArtifact(artifact.meta, bytes(data))


def garbage_with_matching_digest(artifact: KernelArtifact) -> KernelArtifact:
    data = b"not a kernel at all"
    meta = artifact.meta.model_copy(update={"digest": digest_of(data), "size_bytes": len(data)})
    return KernelArtifact(meta, data)


# ------------------------------------------------------------------------ hits, misses, tiers


async def test_first_get_fetches_from_the_tier_then_memory_serves(a: KernelArtifact) -> None:
    tier = Tier("urza", [a])
    cache = KernelCache([tier])
    first = await cache.get(kid(a))
    second = await cache.get(kid(a))
    assert first is second
    assert first.meta == a.meta
    assert kid(a) in cache and len(cache) == 1
    assert tier.fetches[kid(a)] == 1
    assert cache.stats() == {
        "memory": {"hits": 1, "misses": 1, "errors": 0, "rejected": 0},
        "urza": {"hits": 1, "misses": 0, "errors": 0, "rejected": 0},
    }


async def test_template_runs_and_is_function_preserving(a: KernelArtifact) -> None:
    entry = await KernelCache([Tier("t", [a])]).get(kid(a))
    out = entry.template(torch.randn(3, 8))
    assert out.shape == (3, 8) and torch.count_nonzero(out) == 0
    assert entry.nbytes == sum(p.numel() * 4 for p in entry.template.parameters())


async def test_a_miss_in_one_tier_is_counted_and_the_next_tier_serves(a: KernelArtifact) -> None:
    redis, urza = Tier("redis"), Tier("urza", [a])
    cache = KernelCache([redis, urza])
    await cache.get(kid(a))
    stats = cache.stats()
    assert stats["redis"]["misses"] == 1 and stats["redis"]["hits"] == 0
    assert stats["urza"]["hits"] == 1


async def test_artifact_from_a_later_tier_is_written_back_to_earlier_tiers(
    a: KernelArtifact,
) -> None:
    memo, redis, urza = Tier("memo"), Tier("redis"), Tier("urza", [a])
    cache = KernelCache([memo, redis, urza])
    await cache.get(kid(a))
    assert [kid(x) for x in memo.stored] == [kid(a)]
    assert [kid(x) for x in redis.stored] == [kid(a)]
    assert urza.stored == []
    cache.clear()
    await cache.get(kid(a))  # now the first tier has it
    assert memo.fetches[kid(a)] == 2 and urza.fetches[kid(a)] == 1


async def test_a_failing_write_back_does_not_fail_the_get(a: KernelArtifact) -> None:
    class ReadOnly(Tier):
        async def store(self, artifact: KernelArtifact) -> None:
            raise OSError("read-only")

    cache = KernelCache([ReadOnly("ro"), Tier("urza", [a])])
    assert (await cache.get(kid(a))).meta.kernel_id == kid(a)


async def test_names_and_tags_resolve_through_the_tiers(a: KernelArtifact) -> None:
    urza = Tier("urza", [a], tags={"efficiency_kernel_v1": kid(a)})
    cache = KernelCache([Tier("redis"), urza])
    assert await cache.resolve("efficiency_kernel_v1") == kid(a)
    entry = await cache.get("efficiency_kernel_v1")
    assert entry.meta.kernel_id == kid(a)


async def test_unknown_name_lists_the_tiers(a: KernelArtifact) -> None:
    cache = KernelCache([Tier("redis"), Tier("urza", [a])])
    with pytest.raises(UnknownKernelError, match=r"'no_such_kernel' \(looked in: redis, urza\)"):
        await cache.get("no_such_kernel")


async def test_unknown_kernel_id_names_every_tier(a: KernelArtifact) -> None:
    cache = KernelCache([Tier("redis"), Tier("urza", [a])])
    missing = kernel_id_for({"missing": True})
    with pytest.raises(
        UnknownKernelError, match=rf"{missing} is in no cache tier \(memory, redis, urza\)"
    ):
        await cache.get(missing)
    assert missing not in cache


async def test_cache_without_tiers_says_so() -> None:
    with pytest.raises(UnknownKernelError, match="no tiers configured"):
        await KernelCache().get("anything")


# ------------------------------------------------------------------------ failing tiers


async def test_a_tier_that_raises_is_counted_and_the_next_tier_is_tried(a: KernelArtifact) -> None:
    redis, urza = Tier("redis", [a]), Tier("urza", [a])
    redis.fetch_error = ConnectionError("redis is down")
    cache = KernelCache([redis, urza])
    entry = await cache.get(kid(a))
    assert entry.meta.kernel_id == kid(a)
    assert cache.stats()["redis"]["errors"] == 1
    assert cache.stats()["urza"]["hits"] == 1


async def test_a_tier_raising_an_esper_fetch_error_does_not_stop_the_chain(
    a: KernelArtifact,
) -> None:
    redis, urza = Tier("redis", [a]), Tier("urza", [a])
    redis.fetch_error = KernelFetchError("circuit open")
    assert (await KernelCache([redis, urza]).get(kid(a))).meta.kernel_id == kid(a)


async def test_a_tier_raising_unknown_kernel_is_a_miss(a: KernelArtifact) -> None:
    redis, urza = Tier("redis", [a]), Tier("urza", [a])
    redis.fetch_error = UnknownKernelError("404")
    cache = KernelCache([redis, urza])
    await cache.get(kid(a))
    assert cache.stats()["redis"] == {"hits": 0, "misses": 1, "errors": 0, "rejected": 0}


async def test_when_every_tier_fails_the_error_names_each_tier(a: KernelArtifact) -> None:
    redis, urza = Tier("redis", [a]), Tier("urza", [a])
    redis.fetch_error = ConnectionError("connection refused")
    urza.fetch_error = TimeoutError("read timed out")
    cache = KernelCache([redis, urza])
    with pytest.raises(KernelFetchError) as caught:
        await cache.get(kid(a))
    message = str(caught.value)
    assert kid(a) in message
    assert "redis: ConnectionError: connection refused" in message
    assert "urza: TimeoutError: read timed out" in message
    assert kid(a) not in cache


async def test_a_tier_failing_to_resolve_is_skipped(a: KernelArtifact) -> None:
    broken, urza = Tier("broken"), Tier("urza", [a], tags={"eff": kid(a)})
    broken.resolve_error = ConnectionError("down")
    cache = KernelCache([broken, urza])
    assert await cache.resolve("eff") == kid(a)
    assert cache.stats()["broken"]["errors"] == 1


async def test_a_name_no_tier_could_look_up_is_a_fetch_error_not_an_unknown_name(
    a: KernelArtifact,
) -> None:
    urza = Tier("urza", [a], tags={"eff": kid(a)})
    urza.resolve_error = ConnectionError("urza unreachable")
    with pytest.raises(KernelFetchError, match="urza: ConnectionError: urza unreachable"):
        await KernelCache([Tier("redis"), urza]).get("eff")


# ------------------------------------------------------------------------ the memory LRU


async def test_lru_is_bounded_in_bytes_and_evicts_the_least_recently_used(
    kernels: list[KernelArtifact],
) -> None:
    a, b, c = kernels
    sizes = {kid(x): (await KernelCache([Tier("t", [x])]).get(kid(x))).nbytes for x in kernels}
    assert sizes[kid(a)] < sizes[kid(b)] < sizes[kid(c)]
    cache = KernelCache([Tier("t", kernels)], max_bytes=sizes[kid(a)] + sizes[kid(c)])
    await cache.get(kid(a))
    await cache.get(kid(b))
    assert cache.nbytes == sizes[kid(a)] + sizes[kid(b)]
    await cache.get(kid(a))  # a is now the most recently used
    await cache.get(kid(c))  # c does not fit next to both: b, the least recently used, goes
    assert kid(b) not in cache and kid(a) in cache and kid(c) in cache
    assert cache.nbytes == sizes[kid(a)] + sizes[kid(c)] <= cache.max_bytes
    assert len(cache) == 2


async def test_lru_evicts_oldest_entries_first_until_the_new_one_fits(
    kernels: list[KernelArtifact],
) -> None:
    a, b, c = kernels
    tier = Tier("t", kernels)
    probe = KernelCache([tier])
    size_c = (await probe.get(kid(c))).nbytes
    cache = KernelCache([tier], max_bytes=size_c)
    await cache.get(kid(a))
    await cache.get(kid(b))
    await cache.get(kid(c))
    assert [kid(k) in cache for k in (a, b, c)] == [False, False, True]
    assert cache.nbytes == size_c


async def test_an_entry_larger_than_the_cache_is_served_but_not_kept(a: KernelArtifact) -> None:
    tier = Tier("t", [a])
    cache = KernelCache([tier], max_bytes=16)
    entry = await cache.get(kid(a))
    assert isinstance(entry, CachedKernel) and entry.nbytes > 16
    assert kid(a) not in cache and len(cache) == 0 and cache.nbytes == 0
    await cache.get(kid(a))
    assert tier.fetches[kid(a)] == 2


async def test_clear_empties_memory(a: KernelArtifact) -> None:
    cache = KernelCache([Tier("t", [a])])
    await cache.get(kid(a))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and kid(a) not in cache


# ------------------------------------------------------------------------ coalescing


async def test_concurrent_gets_of_one_kernel_share_one_fetch(a: KernelArtifact) -> None:
    tier = Tier("urza", [a])
    tier.hold()
    cache = KernelCache([tier])
    tasks = [asyncio.create_task(cache.get(kid(a))) for _ in range(12)]
    assert tier.entered is not None and tier.gate is not None
    await tier.entered.wait()
    tier.gate.set()
    entries = await asyncio.gather(*tasks)
    assert tier.fetches[kid(a)] == 1
    assert all(entry is entries[0] for entry in entries)
    assert cache.stats()["urza"]["hits"] == 1


async def test_concurrent_gets_of_different_kernels_fetch_each(
    kernels: list[KernelArtifact],
) -> None:
    tier = Tier("urza", kernels)
    cache = KernelCache([tier])
    entries = await asyncio.gather(*(cache.get(kid(k)) for k in kernels for _ in range(3)))
    assert {e.meta.kernel_id for e in entries} == {kid(k) for k in kernels}
    assert tier.fetches == Counter({kid(k): 1 for k in kernels})


async def test_a_failed_shared_fetch_fails_every_waiter_and_caches_nothing(
    a: KernelArtifact,
) -> None:
    tier = Tier("urza", [a])
    tier.hold()
    tier.fetch_error = ConnectionError("reset by peer")
    cache = KernelCache([tier])
    tasks = [asyncio.create_task(cache.get(kid(a))) for _ in range(8)]
    assert tier.entered is not None and tier.gate is not None
    await tier.entered.wait()
    tier.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, KernelFetchError) and "reset by peer" in str(r) for r in results)
    assert tier.fetches[kid(a)] == 1
    assert kid(a) not in cache

    tier.fetch_error, tier.gate, tier.entered = None, None, None
    assert (await cache.get(kid(a))).meta.kernel_id == kid(a)
    assert tier.fetches[kid(a)] == 2


async def test_a_tampered_shared_fetch_fails_every_waiter_with_the_typed_error(
    a: KernelArtifact,
) -> None:
    tier = Tier("urza", [flipped(a)])
    tier.hold()
    cache = KernelCache([tier])
    tasks = [asyncio.create_task(cache.get(kid(a))) for _ in range(5)]
    assert tier.entered is not None and tier.gate is not None
    await tier.entered.wait()
    tier.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, DigestMismatchError) for r in results)
    assert cache.stats()["urza"]["rejected"] == 1 and kid(a) not in cache


async def test_cancelling_the_first_caller_does_not_cancel_the_fetch_for_the_others(
    a: KernelArtifact,
) -> None:
    tier = Tier("urza", [a])
    tier.hold()
    cache = KernelCache([tier])
    first = asyncio.create_task(cache.get(kid(a)))
    second = asyncio.create_task(cache.get(kid(a)))
    assert tier.entered is not None and tier.gate is not None
    await tier.entered.wait()
    first.cancel()
    tier.gate.set()
    entry = await second
    assert entry.meta.kernel_id == kid(a)
    with pytest.raises(asyncio.CancelledError):
        await first
    assert tier.fetches[kid(a)] == 1 and kid(a) in cache


# ------------------------------------------------------------------------ refusing bad artifacts


def wrong_id(a: KernelArtifact) -> KernelArtifact:
    return KernelArtifact(
        a.meta.model_copy(update={"kernel_id": kernel_id_for({"other": 1})}), a.data
    )


TAMPERINGS = {
    "digest-mismatch": (flipped, DigestMismatchError, None),
    "truncated": (lambda a: KernelArtifact(a.meta, a.data[:-1]), DigestMismatchError, None),
    "signed-with-another-key": (lambda a: a.signed(b"not the key"), SignatureMismatchError, KEY),
    "unsigned-when-a-key-is-set": (lambda a: a, SignatureMismatchError, KEY),
    "corrupt-bytes-with-matching-digest": (
        garbage_with_matching_digest,
        CorruptArtifactError,
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
async def test_a_tampered_artifact_is_refused_counted_never_cached_and_a_good_fetch_then_works(
    a: KernelArtifact, case: str
) -> None:
    tamper, error, key = TAMPERINGS[case]
    tier = Tier("urza", [tamper(a)])
    cache = KernelCache([tier], signing_key=key)
    with pytest.raises(error, match=kid(a)):
        await cache.get(kid(a))
    assert cache.stats()["urza"]["rejected"] == 1
    assert kid(a) not in cache and len(cache) == 0

    tier.artifacts[kid(a)] = a.signed(KEY) if key else a
    assert (await cache.get(kid(a))).meta.kernel_id == kid(a)
    assert kid(a) in cache


async def test_an_artifact_with_another_kernels_id_is_refused(a: KernelArtifact) -> None:
    tier = Tier("urza")
    tier.artifacts[kid(a)] = wrong_id(a)  # asked for a, serves something claiming to be another
    cache = KernelCache([tier])
    with pytest.raises(ArtifactError, match=f"when asked for {kid(a)}"):
        await cache.get(kid(a))
    assert cache.stats()["urza"]["rejected"] == 1 and len(cache) == 0


async def test_a_tampered_copy_in_one_tier_falls_through_to_a_good_copy_and_is_replaced(
    a: KernelArtifact,
) -> None:
    redis, urza = Tier("redis", [flipped(a)]), Tier("urza", [a])
    cache = KernelCache([redis, urza])
    entry = await cache.get(kid(a))
    assert entry.meta.kernel_id == kid(a)
    assert cache.stats()["redis"]["rejected"] == 1
    assert redis.artifacts[kid(a)].data == a.data  # written back over the bad copy


async def test_signed_artifacts_pass_a_cache_with_the_key(a: KernelArtifact) -> None:
    cache = KernelCache([Tier("urza", [a.signed(KEY)])], signing_key=KEY)
    assert (await cache.get(kid(a))).meta.hmac_sha256


# ------------------------------------------------------------------------ put and get_sync


def test_put_verifies_and_keeps_a_local_artifact(a: KernelArtifact) -> None:
    cache = KernelCache()
    entry = cache.put(a)
    assert kid(a) in cache and cache.get_sync(kid(a)) is entry
    with pytest.raises(DigestMismatchError):
        KernelCache().put(flipped(a))
    with pytest.raises(SignatureMismatchError):
        KernelCache(signing_key=KEY).put(a)


def test_get_sync_outside_an_event_loop(a: KernelArtifact) -> None:
    tier = Tier("urza", [a], tags={"eff": kid(a)})
    cache = KernelCache([tier])
    entry = cache.get_sync("eff")
    assert entry.meta.kernel_id == kid(a)
    assert cache.get_sync(kid(a)) is entry
    assert tier.fetches[kid(a)] == 1


async def test_get_sync_inside_a_running_event_loop(a: KernelArtifact) -> None:
    tier = Tier("urza", [a], tags={"eff": kid(a)})
    cache = KernelCache([tier])
    entry = cache.get_sync(
        "eff"
    )  # called from a coroutine: must not nest or block the loop forever
    assert entry.meta.kernel_id == kid(a)
    assert (await cache.get("eff")) is entry
    assert tier.fetches[kid(a)] == 1


def test_get_sync_raises_the_typed_error(a: KernelArtifact) -> None:
    with pytest.raises(UnknownKernelError):
        KernelCache([Tier("urza", [a])]).get_sync("missing")


async def test_loading_by_id_asks_no_tier_to_resolve(a: KernelArtifact) -> None:
    redis, urza = Tier("redis"), Tier("urza", [a])
    cache = KernelCache([redis, urza])
    await cache.get(kid(a))
    assert redis.resolves == urza.resolves == 0
    assert urza.fetches[kid(a)] == 1

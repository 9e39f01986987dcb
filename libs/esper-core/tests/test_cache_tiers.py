"""The remote tiers of the KernelCache, on real sockets: RedisKernelTier against a real
redis-server, UrzaKernelTier against a port with nothing listening and against `ScriptedUrza`, a
real HTTP server in a thread that speaks the Urza contract and answers from a per-path script."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis.asyncio as aioredis
import torch
from torch import nn

from esper.exceptions import (
    ArtifactError,
    ConfigError,
    DigestMismatchError,
    KernelFetchError,
    KernelUnreachableError,
    ServiceError,
    ServiceUnreachableError,
    UnknownKernelError,
    is_transient,
)
from esper.kernels import (
    KernelArtifact,
    KernelCache,
    RedisKernelTier,
    UrzaKernelTier,
    tiered_cache,
)
from esper.kernels.artifact import kernel_id_for
from esper.registry import LocalKernelRegistry
from esper.testing import free_port

KEY = b"tier-key"


@pytest.fixture(scope="module")
def compiled() -> tuple[LocalKernelRegistry, KernelArtifact]:
    """One exported kernel, compiled once: the registry that holds it, and its artifact."""
    registry = LocalKernelRegistry()
    meta = registry.compile("low_rank", nn.Linear(8, 8), tags=["eff_v1"])
    artifact = asyncio.run(registry.fetch(meta.kernel_id))
    assert artifact is not None
    return registry, artifact


@pytest.fixture
def artifact(compiled: tuple[LocalKernelRegistry, KernelArtifact]) -> KernelArtifact:
    return compiled[1]


@pytest.fixture
def local(compiled: tuple[LocalKernelRegistry, KernelArtifact]) -> LocalKernelRegistry:
    return compiled[0]


def kid(artifact: KernelArtifact) -> str:
    return artifact.meta.kernel_id


def flipped(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def works(module: nn.Module) -> bool:
    return bool(module(torch.randn(3, 8)).shape == (3, 8))


# ============================================================================ Redis


@pytest.fixture
async def tier(redis_url: str) -> AsyncIterator[RedisKernelTier]:
    tier = RedisKernelTier(redis_url, ttl_s=600)
    yield tier
    await tier.aclose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at and damaging what the tier wrote."""
    redis = aioredis.Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


async def test_a_kernel_from_a_later_tier_is_written_to_redis_and_a_fresh_cache_hits_it(
    tier: RedisKernelTier,
    local: LocalKernelRegistry,
    artifact: KernelArtifact,
    client: aioredis.Redis,
    redis_url: str,
) -> None:
    first = KernelCache([tier, local])
    entry = await first.get(kid(artifact))
    assert works(entry.template)
    assert first.stats()["redis"]["misses"] == 1 and first.stats()["local"]["hits"] == 1
    assert tier.stats() == {"hits": 0, "misses": 1, "stores": 1, "corrupt": 0}
    stored = await client.hgetall(tier.key(kid(artifact)))
    assert set(stored) == {b"meta", b"data"} and stored[b"data"] == artifact.data
    assert 590 <= await client.ttl(tier.key(kid(artifact))) <= 600

    other = RedisKernelTier(redis_url)  # another process: its own memory, the same Redis
    empty = LocalKernelRegistry()
    second = KernelCache([other, empty])
    again = await second.get(kid(artifact))
    assert again.meta == artifact.meta and works(again.template)
    assert second.stats()["redis"]["hits"] == 1 and second.stats()["local"]["misses"] == 0
    assert other.stats()["hits"] == 1
    await other.aclose()


async def test_a_hit_refreshes_the_ttl(
    tier: RedisKernelTier, artifact: KernelArtifact, client: aioredis.Redis
) -> None:
    await tier.store(artifact)
    await client.expire(tier.key(kid(artifact)), 5)
    assert await tier.fetch(kid(artifact)) == artifact
    assert await client.ttl(tier.key(kid(artifact))) > 500


async def test_resolve_leaves_names_to_urza(
    tier: RedisKernelTier, artifact: KernelArtifact
) -> None:
    await tier.store(artifact)
    assert await tier.resolve("eff_v1") is None
    assert await tier.resolve(kid(artifact)) is None


def damaged_entries(artifact: KernelArtifact) -> dict[str, dict[str, bytes]]:
    meta = artifact.meta.model_dump_json().encode()
    other = artifact.meta.model_copy(update={"kernel_id": kernel_id_for({"other": 1})})
    return {
        "meta-not-json": {"meta": b"{not json", "data": artifact.data},
        "meta-not-a-kernel-meta": {"meta": b'{"kernel_id": 7}', "data": artifact.data},
        "bytes-flipped": {"meta": meta, "data": flipped(artifact.data)},
        "bytes-truncated": {"meta": meta, "data": artifact.data[:-1]},
        "no-data-field": {"meta": meta},
        "no-meta-field": {"data": artifact.data},
        "another-kernel": {"meta": other.model_dump_json().encode(), "data": artifact.data},
    }


@pytest.mark.parametrize(
    "case",
    [
        "meta-not-json",
        "meta-not-a-kernel-meta",
        "bytes-flipped",
        "bytes-truncated",
        "no-data-field",
        "no-meta-field",
        "another-kernel",
    ],
)
async def test_a_corrupt_entry_is_deleted_and_the_next_tier_serves(
    tier: RedisKernelTier,
    local: LocalKernelRegistry,
    artifact: KernelArtifact,
    client: aioredis.Redis,
    case: str,
) -> None:
    key = tier.key(kid(artifact))
    await client.hset(key, mapping=damaged_entries(artifact)[case])  # type: ignore[arg-type]
    assert await tier.fetch(kid(artifact)) is None
    assert await client.exists(key) == 0
    assert tier.stats()["corrupt"] == 1

    await client.hset(key, mapping=damaged_entries(artifact)[case])  # type: ignore[arg-type]
    cache = KernelCache([tier, local])
    entry = await cache.get(kid(artifact))
    assert works(entry.template)
    # A miss, not a refusal: the cache never saw the bad copy, and a good one replaced it.
    assert cache.stats()["redis"] == {"hits": 0, "misses": 1, "errors": 0, "rejected": 0}
    assert await client.hget(key, "data") == artifact.data
    assert tier.stats()["corrupt"] == 2


async def test_an_artifact_over_the_size_limit_is_not_kept(
    redis_url: str, artifact: KernelArtifact, client: aioredis.Redis
) -> None:
    small = RedisKernelTier(redis_url, max_artifact_bytes=len(artifact.data) - 1)
    await small.store(artifact)
    assert await client.exists(small.key(kid(artifact))) == 0
    assert small.stats()["stores"] == 0
    await small.aclose()


async def test_the_prefix_namespaces_the_keys(
    redis_url: str, artifact: KernelArtifact, client: aioredis.Redis
) -> None:
    staging = RedisKernelTier(redis_url, prefix="staging:")
    await staging.store(artifact)
    assert await client.keys("*") == [f"staging:kernel:{kid(artifact)}".encode()]
    assert await RedisKernelTier(redis_url).fetch(kid(artifact)) is None
    await staging.aclose()


async def test_an_unreachable_redis_is_a_failed_tier_not_a_failed_get(
    local: LocalKernelRegistry, artifact: KernelArtifact
) -> None:
    down = RedisKernelTier(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    cache = KernelCache([down, local])
    started = time.monotonic()
    assert works((await cache.get(kid(artifact))).template)
    assert time.monotonic() - started < 2.0
    assert cache.stats()["redis"]["errors"] == 1
    await down.aclose()


def test_invalid_redis_settings_are_config_errors() -> None:
    for bad in ({"ttl_s": 0}, {"max_artifact_bytes": -1}, {"socket_timeout_s": 0}):
        with pytest.raises(ConfigError):
            RedisKernelTier("redis://localhost", **bad)  # type: ignore[arg-type]


async def connected_clients(client: aioredis.Redis) -> int:
    """Connections the server has, this client's own included."""
    info = await client.info("clients")
    return int(info["connected_clients"])


async def test_get_sync_inside_a_running_loop_uses_and_closes_its_own_client(
    tier: RedisKernelTier,
    local: LocalKernelRegistry,
    artifact: KernelArtifact,
    client: aioredis.Redis,
) -> None:
    await tier.store(artifact)  # this loop's client is now open
    baseline = await connected_clients(client)
    cache = KernelCache([tier, local])
    entry = cache.get_sync(kid(artifact))  # runs on a fresh loop in a worker thread
    assert works(entry.template)
    assert cache.stats()["redis"]["hits"] == 1
    # The worker loop's connection was closed when that loop shut down, not leaked.
    deadline = time.monotonic() + 2.0
    while await connected_clients(client) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await connected_clients(client) == baseline
    # And this loop's client still works.
    cache.clear()
    assert (await cache.get(kid(artifact))).meta == artifact.meta
    assert cache.stats()["redis"]["hits"] == 2


def test_get_sync_from_a_thread_without_a_loop(
    redis_url: str, local: LocalKernelRegistry, artifact: KernelArtifact
) -> None:
    tier = RedisKernelTier(redis_url)
    asyncio.run(tier.store(artifact))
    cache = KernelCache([tier, local])
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        entry = pool.submit(cache.get_sync, kid(artifact)).result()
    assert works(entry.template)
    assert cache.stats()["redis"]["hits"] == 1


def test_one_tier_fetches_from_many_threads_at_once(
    redis_url: str, artifact: KernelArtifact
) -> None:
    """Each thread's asyncio.run is a loop of its own, and so gets a client of its own."""
    tier = RedisKernelTier(redis_url)
    asyncio.run(tier.store(artifact))
    start = threading.Barrier(8)

    def fetch() -> KernelArtifact | None:
        start.wait()
        return asyncio.run(tier.fetch(kid(artifact)))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        fetched = list(pool.map(lambda _: fetch(), range(8)))
    assert fetched == [artifact] * 8
    assert tier.stats()["hits"] == 8


# ============================================================================ HTTP


def meta_header(artifact: KernelArtifact) -> str:
    return base64.urlsafe_b64encode(artifact.meta.model_dump_json().encode()).decode()


def error_body(kind: str, message: str) -> bytes:
    return json.dumps(
        {"error": {"type": kind, "message": message, "location": None, "details": {}}}
    ).encode()


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def artifact_reply(
    artifact: KernelArtifact, data: bytes | None = None, *, with_meta: bool = True
) -> Reply:
    meta = artifact.meta
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{meta.digest.removeprefix("sha256:")}"',
        "X-Esper-Digest": meta.digest,
    }
    if meta.hmac_sha256:
        headers["X-Esper-Signature"] = meta.hmac_sha256
    if with_meta:
        headers["X-Esper-Kernel-Meta"] = meta_header(artifact)
    return Reply(200, artifact.data if data is None else data, headers)


def meta_reply(artifact: KernelArtifact) -> Reply:
    return Reply(
        200, artifact.meta.model_dump_json().encode(), {"Content-Type": "application/json"}
    )


class ScriptedUrza:
    """A real HTTP server on 127.0.0.1: each path answers with its queued replies in order (the
    last one repeats); unknown paths get Urza's 404. Every request is recorded."""

    def __init__(self, port: int = 0) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        urza = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = urza._next(self.path, dict(self.headers))
                time.sleep(reply.delay_s)
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self.script[path] = list(replies)

    def serve(self, artifact: KernelArtifact, *, tag: str | None = None) -> None:
        self.on(f"/kernels/{kid(artifact)}/artifact", artifact_reply(artifact))
        self.on(f"/kernels/{kid(artifact)}", meta_reply(artifact))
        if tag:
            self.on(f"/kernels/{tag}", meta_reply(artifact))

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for seen, _ in self.requests if seen == path)

    def _next(self, path: str, headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append((path, headers))
            queue = self.script.get(path)
            if not queue:
                return Reply(404, error_body("unknown_kernel", f"no kernel at {path}"))
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def urza() -> Iterator[ScriptedUrza]:
    server = ScriptedUrza()
    yield server
    server.close()


def state(tier: UrzaKernelTier) -> str:
    # A function, so that mypy does not narrow the property across the awaits that change it.
    return tier.breaker_state


def fast_tier(url: str, **options: float | int | str) -> UrzaKernelTier:
    settings: dict[str, float | int | str] = {
        "retries": 3,
        "backoff_s": 0.005,
        "backoff_max_s": 0.02,
        "timeout_s": 2.0,
        "breaker_threshold": 3,
        "breaker_reset_s": 0.2,
        **options,
    }
    return UrzaKernelTier(url, **settings)  # type: ignore[arg-type]


async def test_503s_are_retried_and_the_kernel_loads_through_the_cache(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    busy = Reply(503, error_body("unavailable", "warming up"), {"Retry-After": "0"})
    path = f"/kernels/{kid(artifact)}/artifact"
    urza.on(path, busy, busy, artifact_reply(artifact))
    http = fast_tier(urza.url, token="s3cret")
    cache = KernelCache([http])
    entry = await cache.get(kid(artifact))
    assert works(entry.template) and entry.meta == artifact.meta
    assert urza.hits(path) == 3
    assert http.stats() == {
        "requests": 1,
        "retries": 2,
        "failures": 0,
        "breaker_opens": 0,
        "short_circuits": 0,
    }
    assert all(h.get("Authorization") == "Bearer s3cret" for _, h in urza.requests)
    assert state(http) == "closed"
    await http.aclose()


async def test_retryable_statuses_that_never_clear_are_a_fetch_error_with_the_message(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    urza.on(path, Reply(502, error_body("bad_gateway", "upstream is down")))
    http = fast_tier(urza.url, retries=2)
    with pytest.raises(KernelFetchError, match=r"HTTP 502: upstream is down \(after 3 attempts\)"):
        await http.fetch(kid(artifact))
    assert urza.hits(path) == 3
    assert http.stats()["failures"] == 1
    await http.aclose()


async def test_other_errors_are_not_retried_and_do_not_trip_the_breaker(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    http = fast_tier(urza.url, breaker_threshold=2)
    urza.on(path, Reply(500, error_body("internal", "disk on fire")))
    for _ in range(3):
        with pytest.raises(KernelFetchError, match=rf"{path}: HTTP 500: disk on fire"):
            await http.fetch(kid(artifact))
    urza.on(path, Reply(401, b"no token, no kernel", {"Content-Type": "text/plain"}))
    with pytest.raises(KernelFetchError, match="HTTP 401: no token, no kernel"):
        await http.fetch(kid(artifact))
    assert urza.hits(path) == 4
    assert http.stats()["retries"] == 0 and http.stats()["failures"] == 4
    assert state(http) == "closed"
    await http.aclose()


async def test_a_404_is_a_miss_and_the_cache_says_unknown_kernel(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    http = fast_tier(urza.url)
    assert await http.fetch(kid(artifact)) is None
    assert await http.resolve("no_such_tag") is None
    with pytest.raises(UnknownKernelError, match=kid(artifact)):
        await KernelCache([http]).get(kid(artifact))
    with pytest.raises(UnknownKernelError, match="no_such_tag"):
        await KernelCache([http]).get("no_such_tag")
    assert http.stats()["failures"] == 0 and http.stats()["retries"] == 0
    await http.aclose()


async def test_tags_resolve_through_urza(urza: ScriptedUrza, artifact: KernelArtifact) -> None:
    urza.serve(artifact, tag="eff_v1")
    http = fast_tier(urza.url)
    cache = KernelCache([http])
    assert await http.resolve("eff_v1") == kid(artifact)
    assert (await cache.get("eff_v1")).meta.kernel_id == kid(artifact)
    await http.aclose()


async def test_refs_are_quoted_into_one_path_segment(urza: ScriptedUrza) -> None:
    http = fast_tier(urza.url)
    assert await http.resolve("../admin?x=1") is None
    assert urza.requests[-1][0] == "/kernels/..%2Fadmin%3Fx%3D1"
    await http.aclose()


async def test_tampered_bytes_are_refused_by_the_cache_and_nothing_is_cached(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    urza.on(
        f"/kernels/{kid(artifact)}/artifact",
        artifact_reply(artifact, data=flipped(artifact.data)),
    )
    cache = KernelCache([fast_tier(urza.url)])
    with pytest.raises(DigestMismatchError, match=kid(artifact)):
        await cache.get(kid(artifact))
    assert len(cache) == 0 and cache.stats()["http"]["rejected"] == 1


async def test_a_meta_header_naming_another_kernel_is_an_artifact_error(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    asked = kernel_id_for({"asked": True})
    urza.on(f"/kernels/{asked}/artifact", artifact_reply(artifact))
    http = fast_tier(urza.url)
    with pytest.raises(ArtifactError, match=f"sent kernel {kid(artifact)} when asked for {asked}"):
        await http.fetch(asked)
    # An ArtifactError from a tier is a refusal (typed, counted as rejected), not a tier failure.
    cache = KernelCache([http])
    with pytest.raises(ArtifactError, match=f"when asked for {asked}"):
        await cache.get(asked)
    assert cache.stats()["http"]["rejected"] == 1 and len(cache) == 0
    await http.aclose()


@pytest.mark.parametrize("header", ["missing", "not-base64", "not-a-meta"])
async def test_without_a_readable_meta_header_the_meta_is_fetched(
    urza: ScriptedUrza, artifact: KernelArtifact, header: str
) -> None:
    reply = artifact_reply(artifact, with_meta=False)
    if header == "not-base64":
        reply.headers["X-Esper-Kernel-Meta"] = "%%%"
    elif header == "not-a-meta":
        reply.headers["X-Esper-Kernel-Meta"] = base64.urlsafe_b64encode(b"{}").decode()
    urza.on(f"/kernels/{kid(artifact)}/artifact", reply)
    urza.on(f"/kernels/{kid(artifact)}", meta_reply(artifact))
    http = fast_tier(urza.url)
    fetched = await http.fetch(kid(artifact))
    assert fetched == artifact
    assert urza.hits(f"/kernels/{kid(artifact)}") == 1
    await http.aclose()


async def test_an_unpadded_meta_header_is_read(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    reply = artifact_reply(artifact)
    reply.headers["X-Esper-Kernel-Meta"] = meta_header(artifact).rstrip("=")
    urza.on(f"/kernels/{kid(artifact)}/artifact", reply)
    assert await fast_tier(urza.url).fetch(kid(artifact)) == artifact
    assert urza.hits(f"/kernels/{kid(artifact)}") == 0


async def test_a_digest_header_contradicting_the_meta_is_an_artifact_error(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    reply = artifact_reply(artifact)
    reply.headers["X-Esper-Digest"] = "sha256:" + "0" * 64
    urza.on(f"/kernels/{kid(artifact)}/artifact", reply)
    with pytest.raises(ArtifactError, match="contradicts"):
        await fast_tier(urza.url).fetch(kid(artifact))


async def test_a_signed_kernel_passes_a_cache_with_the_key(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    signed = artifact.signed(KEY)
    reply = artifact_reply(signed, with_meta=False)  # the meta lacks the HMAC, the header has it
    reply.headers["X-Esper-Kernel-Meta"] = meta_header(artifact)
    urza.on(f"/kernels/{kid(artifact)}/artifact", reply)
    cache = KernelCache([fast_tier(urza.url)], signing_key=KEY)
    assert (await cache.get(kid(artifact))).meta.hmac_sha256 == signed.meta.hmac_sha256


async def test_retry_after_is_honoured_up_to_backoff_max(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    slow_down = Reply(429, error_body("too_many_requests", "slow down"), {"Retry-After": "1"})

    urza.on(path, slow_down, artifact_reply(artifact))
    patient = fast_tier(urza.url, backoff_max_s=5.0)
    started = time.monotonic()
    assert await patient.fetch(kid(artifact)) == artifact
    assert 0.95 <= time.monotonic() - started < 2.0

    urza.on(path, slow_down, artifact_reply(artifact))
    capped = fast_tier(urza.url, backoff_max_s=0.3)
    started = time.monotonic()
    assert await capped.fetch(kid(artifact)) == artifact
    assert 0.28 <= time.monotonic() - started < 0.9
    await patient.aclose()
    await capped.aclose()


async def test_a_slow_answer_times_out_and_is_retried(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    urza.on(path, Reply(200, b"late", delay_s=0.5), artifact_reply(artifact))
    http = fast_tier(urza.url, timeout_s=0.15)
    assert await http.fetch(kid(artifact)) == artifact
    assert http.stats()["retries"] == 1
    await http.aclose()


async def test_connection_refused_is_retried_then_the_breaker_opens_then_recovers(
    artifact: KernelArtifact,
) -> None:
    port = free_port()
    http = fast_tier(f"http://127.0.0.1:{port}", retries=2, breaker_threshold=3)
    for _ in range(3):
        with pytest.raises(KernelFetchError, match=r"ConnectError.*\(after 3 attempts\)"):
            await http.fetch(kid(artifact))
    assert state(http) == "open"
    assert http.stats() == {
        "requests": 3,
        "retries": 6,
        "failures": 3,
        "breaker_opens": 1,
        "short_circuits": 0,
    }

    started = time.monotonic()
    with pytest.raises(KernelFetchError, match="circuit open"):
        await http.fetch(kid(artifact))
    with pytest.raises(KernelFetchError, match="circuit open"):
        await http.resolve("eff_v1")
    assert time.monotonic() - started < 0.1  # no network, no backoff
    assert http.stats()["short_circuits"] == 2 and http.stats()["requests"] == 3

    # Half-open: one trial, one attempt, no retries; it fails, so the breaker opens again.
    await asyncio.sleep(0.25)
    assert state(http) == "half_open"
    with pytest.raises(KernelFetchError, match=r"ConnectError.*\(after 1 attempt\)"):
        await http.fetch(kid(artifact))
    assert state(http) == "open"
    assert http.stats()["retries"] == 6 and http.stats()["breaker_opens"] == 2

    # Urza comes up on that port: the next trial succeeds and closes the breaker.
    urza = ScriptedUrza(port)
    try:
        urza.serve(artifact)
        await asyncio.sleep(0.25)
        cache = KernelCache([http])
        assert works((await cache.get(kid(artifact))).template)
        assert state(http) == "closed"
        assert urza.hits(f"/kernels/{kid(artifact)}/artifact") == 1
    finally:
        urza.close()
        await http.aclose()


async def test_urza_unreachable_or_its_circuit_open_is_worth_retrying_other_failures_are_not(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    """A job retries a germination only on KernelUnreachableError (esper.exceptions.is_transient):
    the tier raises it for no answer and for an open circuit, and the cache keeps it through its
    tiers, for ids and names alike; Urza answering 500 is not one."""
    down = fast_tier(
        f"http://127.0.0.1:{free_port()}", retries=0, breaker_threshold=1, breaker_reset_s=30
    )
    cache = KernelCache([down])
    with pytest.raises(KernelUnreachableError, match="ConnectError") as refused:
        await cache.get(kid(artifact))
    assert is_transient(refused.value)
    with pytest.raises(KernelUnreachableError, match="circuit open"):
        await cache.get(kid(artifact))
    with pytest.raises(KernelUnreachableError, match="circuit open"):
        await cache.resolve("eff_v1")
    await down.aclose()

    path = f"/kernels/{kid(artifact)}/artifact"
    urza.on(path, Reply(500, error_body("internal", "disk on fire")))
    up = fast_tier(urza.url)
    with pytest.raises(KernelFetchError, match="disk on fire") as failed:
        await KernelCache([up]).get(kid(artifact))
    assert not is_transient(failed.value)
    await up.aclose()


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ServiceUnreachableError("urza", "POST /kernels/compile: ConnectError"), True),
        (ServiceError("urza", 429, "rate_limited", "slow down", retry_after_s=1.0), True),
        (ServiceError("urza", 502, "bad_gateway", "upstream"), True),
        (ServiceError("urza", 503, "unavailable", "warming up"), True),
        (ServiceError("urza", 504, "gateway_timeout", "upstream"), True),
        (KernelUnreachableError("every tier failed: http: circuit open"), True),
        (ServiceError("urza", 500, "internal", "a bug answers the same each time"), False),
        (ServiceError("urza", 404, "unknown_blueprint", "no blueprint 'x'"), False),
        (ServiceError("urza", 422, "compile_error", "export failed"), False),
        (KernelFetchError("every tier failed: http: HTTP 401"), False),
        (DigestMismatchError("digest mismatch"), False),
        (RuntimeError("no Urza is configured"), False),
    ],
)
def test_which_errors_are_transient(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_while_a_trial_is_in_flight_other_calls_are_short_circuited(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    http = fast_tier(urza.url, retries=0, breaker_threshold=1, breaker_reset_s=0.05)
    urza.on(path, Reply(503, error_body("unavailable", "down")))
    with pytest.raises(KernelFetchError, match="HTTP 503"):
        await http.fetch(kid(artifact))
    assert state(http) == "open"
    await asyncio.sleep(0.1)
    urza.on(path, Reply(200, artifact.data, artifact_reply(artifact).headers, delay_s=0.3))
    trial = asyncio.create_task(http.fetch(kid(artifact)))
    await asyncio.sleep(0.1)
    assert state(http) == "half_open"
    with pytest.raises(KernelFetchError, match="a trial request is in flight"):
        await http.fetch(kid(artifact))
    assert await trial == artifact
    assert state(http) == "closed"
    await http.aclose()


async def test_a_cancelled_trial_lets_the_next_call_be_the_trial(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    path = f"/kernels/{kid(artifact)}/artifact"
    http = fast_tier(urza.url, retries=0, breaker_threshold=1, breaker_reset_s=0.05)
    urza.on(path, Reply(503, error_body("unavailable", "down")))
    with pytest.raises(KernelFetchError):
        await http.fetch(kid(artifact))
    await asyncio.sleep(0.1)
    urza.on(path, Reply(200, artifact.data, artifact_reply(artifact).headers, delay_s=0.3))
    trial = asyncio.create_task(http.fetch(kid(artifact)))
    await asyncio.sleep(0.1)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    urza.on(path, artifact_reply(artifact))
    assert await http.fetch(kid(artifact)) == artifact
    assert state(http) == "closed"
    await http.aclose()


async def test_get_sync_inside_a_running_loop_with_the_http_tier(
    urza: ScriptedUrza, artifact: KernelArtifact
) -> None:
    urza.serve(artifact, tag="eff_v1")
    http = fast_tier(urza.url)
    cache = KernelCache([http])
    entry = cache.get_sync("eff_v1")  # a worker-thread loop gets its own client
    assert works(entry.template)
    cache.clear()
    assert (await cache.get(kid(artifact))).meta == artifact.meta  # and this loop its own
    await http.aclose()


def test_invalid_http_settings_are_config_errors() -> None:
    bad_options: list[dict[str, float | int]] = [
        {"timeout_s": 0},
        {"retries": -1},
        {"backoff_s": -0.1},
        {"backoff_s": 1.0, "backoff_max_s": 0.5},
        {"breaker_threshold": 0},
        {"breaker_reset_s": -1},
    ]
    for bad in bad_options:
        with pytest.raises(ConfigError):
            UrzaKernelTier("http://urza", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http"):
        UrzaKernelTier("urza:8080")


# ============================================================================ tiered_cache


async def test_tiered_cache_orders_memory_redis_http_then_extras(
    redis_url: str, urza: ScriptedUrza, local: LocalKernelRegistry, artifact: KernelArtifact
) -> None:
    urza.serve(artifact)
    cache = tiered_cache(
        redis_url=redis_url, urza_url=urza.url, urza_token="t", extra_sources=[local]
    )
    assert [s.name for s in cache.sources] == ["redis", "http", "local"]
    assert list(cache.stats()) == ["memory", "redis", "http", "local"]
    assert works((await cache.get(kid(artifact))).template)
    assert cache.stats()["http"]["hits"] == 1 and cache.stats()["local"]["hits"] == 0

    fresh = tiered_cache(redis_url=redis_url)  # the write-back reached Redis
    assert (await fresh.get(kid(artifact))).meta == artifact.meta
    for source in (*cache.sources, *fresh.sources):
        if isinstance(source, RedisKernelTier | UrzaKernelTier):
            await source.aclose()


def test_tiered_cache_without_remote_tiers_and_its_config_errors(
    local: LocalKernelRegistry,
) -> None:
    cache = tiered_cache(extra_sources=[local], signing_key=KEY, max_bytes=1 << 20)
    assert [s.name for s in cache.sources] == ["local"]
    assert cache.signing_key == KEY and cache.max_bytes == 1 << 20
    with pytest.raises(ConfigError, match="urza_url"):
        tiered_cache(urza_token="t")
    with pytest.raises(ConfigError, match="redis"):
        tiered_cache(redis_url="redis://localhost", extra_sources=[RedisKernelTier("redis://x")])

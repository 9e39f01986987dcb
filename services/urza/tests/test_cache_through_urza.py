"""The acceptance path of the kernel cache: a real Urza and a real Redis behind KernelCache's
three tiers, a tagged kernel loaded into a wrapped model, and tampered artifacts refused."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import httpx
import pytest
import redis
import torch
from torch import nn

import esper
from esper.contracts import HostSignature, KernelMeta
from esper.exceptions import KernelFetchError, SignatureMismatchError
from esper.kernels import KernelCache, RedisKernelTier, tiered_cache
from esper.kernels.artifact import digest_of
from esper.testing import RedisServer, ServiceProcess

TOKEN = "tier-token"
KEY = b"tier-signing-key"
HOST = HostSignature.of(nn.Linear(16, 16))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def urza(redis_url: str) -> Iterator[ServiceProcess]:
    with tempfile.TemporaryDirectory() as data:
        env = {
            "ESPER_BUS_REDIS_URL": redis_url,
            "URZA_DATA_DIR": data,
            "URZA_API_TOKEN": TOKEN,
            "URZA_SIGNING_KEY": KEY.decode(),
        }
        with ServiceProcess("urza", port_env="URZA_PORT", env=env) as service:
            yield service


@pytest.fixture(scope="module")
def tagged(urza: ServiceProcess) -> KernelMeta:
    """`efficiency_kernel_v1`: a low-rank kernel for a 16→16 linear layer, compiled by Urza."""
    response = httpx.post(
        f"{urza.url}/kernels/compile",
        json={
            "blueprint": "low_rank",
            "host": HOST.model_dump(mode="json"),
            "tags": ["efficiency_kernel_v1"],
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert response.status_code in (200, 201), response.text
    return KernelMeta.model_validate(response.json()["kernel"])


def cache_for(redis_url: str, urza: ServiceProcess, key: bytes | None = KEY) -> KernelCache:
    return tiered_cache(redis_url=redis_url, urza_url=urza.url, signing_key=key)


async def test_a_kernel_travels_http_then_redis_then_memory(
    redis_url: str, urza: ServiceProcess, tagged: KernelMeta
) -> None:
    redis.Redis.from_url(redis_url).delete(f"esper:kernel:{tagged.kernel_id}")
    first = cache_for(redis_url, urza)
    entry = await first.get("efficiency_kernel_v1")  # a tag: resolved by Urza
    assert entry.meta.kernel_id == tagged.kernel_id and entry.meta.hmac_sha256
    stats = first.stats()
    assert stats["http"]["hits"] == 1 and stats["redis"]["misses"] == 1

    second = cache_for(redis_url, urza)  # a new process's cache: Redis has it now (write-back)
    await second.get(tagged.kernel_id)
    assert second.stats()["redis"]["hits"] == 1 and second.stats()["http"]["hits"] == 0

    await second.get(tagged.kernel_id)
    assert second.stats()["memory"]["hits"] == 1 and second.stats()["redis"]["hits"] == 1


async def test_the_tagged_kernel_loads_into_a_wrapped_model_and_changes_its_output(
    redis_url: str, urza: ServiceProcess, tagged: KernelMeta
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    morphable = esper.wrap(model, seeds_per_layer=2, kernels=cache_for(redis_url, urza))
    x = torch.randn(8, 16)
    before = morphable(x).detach()
    await morphable.load_kernel("0", seed_idx=0, kernel_id="efficiency_kernel_v1")
    morphable.set_seed_alpha("0", seed_idx=0, alpha=0.7)
    assert torch.allclose(morphable(x), before)  # the compiled kernel starts at zero output
    with torch.no_grad():
        for parameter in morphable.seed_parameters():
            parameter.add_(0.5)  # trained a little (its zeroed last layer too)
    assert not torch.allclose(morphable(x), before)


async def test_bytes_tampered_in_redis_are_refused_and_urza_serves_the_real_ones(
    redis_url: str, urza: ServiceProcess, tagged: KernelMeta
) -> None:
    """Someone with write access to Redis swaps the bytes and rewrites the digest to match: only
    the HMAC, which needs Urza's key, tells. The cache refuses them and asks the next tier."""
    await cache_for(redis_url, urza).get(tagged.kernel_id)  # Redis holds the real artifact
    client = redis.Redis.from_url(redis_url)
    key = f"esper:kernel:{tagged.kernel_id}"
    data = bytearray(client.hget(key, "data") or b"")
    data[len(data) // 2] ^= 0xFF
    forged = tagged.model_copy(update={"digest": digest_of(bytes(data))})
    client.hset(key, mapping={"data": bytes(data), "meta": forged.model_dump_json()})

    cache = cache_for(redis_url, urza)
    entry = await cache.get(tagged.kernel_id)
    assert entry.meta.digest == tagged.digest  # the real kernel, from Urza
    assert cache.stats()["redis"]["rejected"] == 1 and cache.stats()["http"]["hits"] == 1

    only_redis = KernelCache([RedisKernelTier(redis_url)], signing_key=KEY)
    client.hset(key, mapping={"data": bytes(data), "meta": forged.model_dump_json()})
    with pytest.raises(SignatureMismatchError):
        await only_redis.get(tagged.kernel_id)
    assert len(only_redis) == 0


async def test_a_cache_with_another_key_refuses_urzas_artifacts(
    redis_url: str, urza: ServiceProcess, tagged: KernelMeta
) -> None:
    cache = tiered_cache(urza_url=urza.url, signing_key=b"not-urzas-key")
    with pytest.raises(SignatureMismatchError):
        await cache.get(tagged.kernel_id)
    assert len(cache) == 0 and cache.stats()["http"]["rejected"] == 1


async def test_a_stopped_urza_is_a_fetch_error_not_an_unknown_kernel(redis_url: str) -> None:
    with tempfile.TemporaryDirectory() as data:
        env = {"ESPER_BUS_REDIS_URL": redis_url, "URZA_DATA_DIR": data}
        service = ServiceProcess("urza", port_env="URZA_PORT", env=env).start()
        url = service.url
        service.stop()
    cache = tiered_cache(urza_url=url)
    with pytest.raises(KernelFetchError):
        await cache.get("efficiency_kernel_v1")

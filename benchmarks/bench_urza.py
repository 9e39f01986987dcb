"""Urza figures, each with its baseline in the same run:

- compile time of every built-in blueprint in both formats (in process, after one warm-up
  compile per pair), p50 per pair and over all built-ins per format;
- a repeat compile of the same input through a running Urza (HTTP round trip + lookup), p50/p99;
- a kernel fetch by cache tier (memory / Redis / HTTP from Urza, each a full `KernelCache.get`
  with verification and deserialization) against a bare `GET` of the same bytes, paired rounds.

Prints one line of figures at the end.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import httpx
import torch
from torch import nn

from _timing import percentile
from esper.blueprints import BUILTIN_BLUEPRINTS, compile_blueprint
from esper.contracts import HostSignature
from esper.contracts.vocabulary import KernelFormat
from esper.kernels import KernelCache, RedisKernelTier, UrzaKernelTier
from esper.testing import RedisServer, ServiceProcess
from esper.testing.hosts import host_for_blueprint

COMPILES = 5
REPEATS = 300
FETCH_ROUNDS = 40
HOSTS = {
    "linear": HostSignature.of(nn.Linear(64, 64)),
    "conv2d": HostSignature.of(nn.Conv2d(32, 32, 3, padding=1)),
}


def compile_times() -> dict[KernelFormat, dict[str, list[float]]]:
    times: dict[KernelFormat, dict[str, list[float]]] = {"export": {}, "torchscript": {}}
    for fmt in times:
        for name, spec in BUILTIN_BLUEPRINTS.items():
            host = host_for_blueprint(spec, HOSTS[spec.hosts[0]])  # `widen` needs a next layer
            compile_blueprint(spec, host, fmt)  # the first compile of a shape pays tracing warm-up
            samples = []
            for _ in range(COMPILES):
                start = time.perf_counter()
                compile_blueprint(spec, host, fmt)
                samples.append((time.perf_counter() - start) * 1000)
            times[fmt][name] = samples
            print(f"compile {fmt:11s} {name:20s} p50 {statistics.median(samples):6.1f} ms")
    return times


def repeat_compile(url: str) -> list[float]:
    body = {"blueprint": "conv3x3", "host": HOSTS["conv2d"].model_dump(mode="json")}
    with httpx.Client(base_url=url) as client:
        client.post("/kernels/compile", json=body).raise_for_status()
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            response = client.post("/kernels/compile", json=body)
            samples.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200 and not response.json()["created"]
    return samples


async def fetch_by_tier(urza_url: str, redis_url: str) -> dict[str, float]:
    body = {"blueprint": "conv3x3", "host": HOSTS["conv2d"].model_dump(mode="json")}
    async with httpx.AsyncClient(base_url=urza_url) as client:
        meta = (await client.post("/kernels/compile", json=body)).json()["kernel"]
        kernel_id, path = meta["kernel_id"], f"/kernels/{meta['kernel_id']}/artifact"
        http = UrzaKernelTier(urza_url)
        redis_tier = RedisKernelTier(redis_url)
        warm = KernelCache([redis_tier, http])
        await warm.get(kernel_id)  # fills Redis (write-back) and this cache's memory

        async def bare() -> None:
            (await client.get(path)).raise_for_status()

        async def memory() -> None:
            await warm.get(kernel_id)

        async def from_redis() -> None:
            await KernelCache([redis_tier]).get(kernel_id)

        async def from_http() -> None:
            await KernelCache([http]).get(kernel_id)

        tiers = {"memory": memory, "redis": from_redis, "http": from_http}
        base_ms: list[float] = []
        tier_ms: dict[str, list[float]] = {name: [] for name in tiers}
        ratios: dict[str, list[float]] = {name: [] for name in tiers}
        for _ in range(FETCH_ROUNDS):
            for name, fetch in tiers.items():  # each tier paired with its own bare GET
                start = time.perf_counter()
                await bare()
                base = time.perf_counter() - start
                start = time.perf_counter()
                await fetch()
                took = time.perf_counter() - start
                base_ms.append(base * 1000)
                tier_ms[name].append(took * 1000)
                ratios[name].append(took / base)
        await http.aclose()
        await redis_tier.aclose()
    figures = {"bare_get_p50_ms": statistics.median(base_ms), "artifact_bytes": meta["size_bytes"]}
    for name in tiers:
        figures[f"{name}_p50_ms"] = statistics.median(tier_ms[name])
        figures[f"{name}_ratio"] = statistics.median(ratios[name])
    return figures


def main() -> None:
    torch.set_num_threads(1)
    times = compile_times()
    p50 = {
        fmt: statistics.median([t for s in per.values() for t in s]) for fmt, per in times.items()
    }
    worst = {fmt: max(statistics.median(s) for s in per.values()) for fmt, per in times.items()}
    with RedisServer() as redis, tempfile.TemporaryDirectory() as data:
        env = {"ESPER_BUS_REDIS_URL": redis.url, "URZA_DATA_DIR": data, "URZA_LOG_LEVEL": "WARNING"}
        with ServiceProcess("urza", port_env="URZA_PORT", env=env) as urza:
            repeats = repeat_compile(urza.url)
            fetch = asyncio.run(fetch_by_tier(urza.url, redis.url))
    figures = {
        "compile_export_p50_ms": p50["export"],
        "compile_export_worst_blueprint_p50_ms": worst["export"],
        "compile_torchscript_p50_ms": p50["torchscript"],
        "compile_torchscript_worst_blueprint_p50_ms": worst["torchscript"],
        "repeat_compile_p50_ms": statistics.median(repeats),
        "repeat_compile_p99_ms": percentile(repeats, 99),
        **fetch,
    }
    print(
        " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    )


if __name__ == "__main__":
    main()

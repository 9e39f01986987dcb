"""Tolaria's `ray` executor: training throughput of the zoo's small CNN job with 2 Ray Train
workers against 1, both on a local Ray started here (tolaria.rayexec.run_on_ray, the executor's
own code, with a real redis-server for the job's bus).

The figure is samples/s(2 workers) / samples/s(1 worker), each the job's own `samples_per_s`
of its last epoch (for 2 workers the ranks' summed rate), the median over ROUNDS of runs that
alternate. Each Ray worker gets `cpus_per_worker` (1) CPU and Ray runs its torch on that many
threads, so on a 2-core machine 1 worker uses one core and 2 workers both; every step adds an
all-reduce of the gradients over loopback, and both ranks evaluate the whole validation split.
Measured here (2 cores): 1.28 (9,385 → 12,058 samples/s). Prints one line of figures at the
end.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from esper.bus import BusSettings, connect
from esper.contracts import JobSpec
from esper.testing import RedisServer
from tolaria.jobstore import JobStore
from tolaria.rayexec import run_on_ray
from tolaria.settings import TolariaSettings

ROUNDS = 2
EPOCHS = 4


def spec(workers: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"kind": "cnn", "channels": [16, 32], "hidden": 64},
            "dataset": {"kind": "npz", "path": "images.npz"},
            "training": {"epochs": EPOCHS, "batch_size": 64, "lr": 0.001, "keep_best": False},
            "morphogenesis": {"enabled": False},
            "distributed": {"workers": workers},
        }
    )


async def register(bus: BusSettings, job_id: str, job: JobSpec) -> None:
    redis = connect(bus)
    try:
        await JobStore(redis, bus.prefix, max_events=1000, max_log_lines=1000).create(job_id, job)
    finally:
        await redis.aclose()


def samples_per_s(settings: TolariaSettings, workers: int) -> float:
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    job = spec(workers)
    asyncio.run(register(settings.bus, job_id, job))
    outcome = run_on_ray(settings, job_id, job)
    rate = outcome.metrics.samples_per_s
    assert outcome.status == "SUCCEEDED" and rate is not None, outcome
    return rate


def main() -> None:
    with tempfile.TemporaryDirectory() as root, RedisServer() as redis:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4000, 3, 16, 16)).astype(np.float32)
        np.savez(Path(root) / "images.npz", x=x, y=rng.integers(0, 10, 4000).astype(np.int64))
        os.environ.update(
            {
                "TOLARIA_DATA_DIR": root,
                "TOLARIA_WORK_DIR": str(Path(root) / "work"),
                "ESPER_BUS_REDIS_URL": redis.url,
                "ESPER_BUS_PREFIX": "bench",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        # No address: each run starts a local Ray of this machine's cores, as a Tolaria with
        # TOLARIA_EXECUTOR=ray and no TOLARIA_RAY_ADDRESS does.
        settings = TolariaSettings(executor="ray", urza_url=None)
        rounds: dict[int, list[float]] = {1: [], 2: []}
        for index in range(ROUNDS):
            for workers in (1, 2) if index % 2 == 0 else (2, 1):
                rounds[workers].append(samples_per_s(settings, workers))
    one, two = statistics.median(rounds[1]), statistics.median(rounds[2])
    figures: dict[str, Any] = {
        "cnn_1_worker_samples_per_s": round(one),
        "cnn_2_workers_samples_per_s": round(two),
        "ray_2_workers_over_1": round(two / one, 2),
        "cores": os.cpu_count(),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

"""Tamiyo's decision latency against a real redis-server and a Tamiyo process started here:

- decision latency: a job's plateaued epoch report is published (its envelope `ts` is taken
  right before the XADD) → Tamiyo reads it in its consumer group, updates the job's state and
  publishes a germinate decision → the decision arrives at a reader of the control stream. Many
  distinct jobs, reports paced at RATE_HZ from another process, as Tolaria jobs send them;
- the baseline, in the same run and the same way: the same envelopes XADDed to a stream the
  reader reads directly (no Tamiyo in between): Redis and the two Python loops alone.

Prints one line of figures at the end (target: decision_p99_ms ≤ 50).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from _timing import percentile
from esper.bus import FIELD
from esper.contracts import Envelope, LayerStats, TelemetryReport
from esper.testing import RedisServer, ServiceProcess

PREFIX = "bench"
JOBS = 1_000
WARMUP_JOBS = 50
RATE_HZ = 200
"""Epoch reports per second: two per job (epoch 0 makes the job known, epoch 1 is the plateau
that triggers the decision), so 100 decisions per second."""
LAYERS = [
    LayerStats(layer=name, activation_variance=0.5, dead_fraction=0.0, grad_norm=grad)
    for name, grad in (("0", 0.2), ("2", 0.5), ("4", 0.9))
]


def reports(job_id: str) -> list[TelemetryReport]:
    return [
        TelemetryReport(
            job_id=job_id,
            epoch=epoch,
            step=(epoch + 1) * 50,
            kind="epoch",
            val_loss=0.69,
            val_accuracy=0.5,
            layers=LAYERS,
        )
        for epoch in (0, 1)
    ]


def publish(url: str, stream: str, rate_hz: int) -> None:
    """The job side, in its own process: paced against the clock, one XADD per report."""
    client = redis.Redis.from_url(url)
    jobs = [f"warm-{i}" for i in range(WARMUP_JOBS)] + [f"job-{i}" for i in range(JOBS)]
    messages = [r for job in jobs for r in reports(job)]
    start = time.perf_counter()
    for i, message in enumerate(messages):
        time.sleep(max(0.0, start + i / rate_hz - time.perf_counter()))
        envelope = Envelope.wrap(message, source="bench")  # ts = now, right before the XADD
        client.xadd(stream, {FIELD: envelope.encode()})
    client.close()


async def arrivals(url: str, stream: str, expected: int, timeout_s: float) -> list[Any]:
    """(arrival time, envelope JSON) of every entry added to `stream` from now on."""
    client = aioredis.Redis.from_url(url)
    last = "$"
    seen: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(seen) < expected and time.monotonic() < deadline:
        reply = await client.xread({stream: last}, count=500, block=500)
        now = time.time()
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                seen.append((now, json.loads(fields[FIELD])))
    await client.aclose()
    return seen


async def measure(url: str, read: str, write: str, expected: int) -> list[Any]:
    reader = asyncio.ensure_future(arrivals(url, read, expected, timeout_s=120))
    await asyncio.sleep(0.2)  # the reader is blocked on the stream before anything is sent
    sender = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish", url, write, str(RATE_HZ)
    )
    if await sender.wait() != 0:
        raise RuntimeError("the publisher process failed")
    return await reader


def decision_latencies(url: str, seen: list[Any]) -> list[float]:
    """Arrival of each decision − `ts` of the report that triggered it (its correlation id)."""
    client = redis.Redis.from_url(url)
    sent = {}
    for _, fields in client.xrange(f"{PREFIX}:telemetry"):
        report = json.loads(fields[FIELD])
        sent[report["id"]] = report["ts"]
    client.close()
    delays = []
    for arrived, envelope in seen:
        if envelope["job_id"].startswith("warm-"):
            continue
        delays.append(arrived - sent[envelope["correlation_id"]])
    if len(delays) != JOBS:
        raise RuntimeError(f"{len(delays)} decisions for {JOBS} plateaued jobs")
    return delays


def main() -> None:
    with RedisServer() as server:
        env = {
            "ESPER_BUS_REDIS_URL": server.url,
            "ESPER_BUS_PREFIX": PREFIX,
            "TAMIYO_URZA_URL": "",  # the built-in blueprints: nothing but Tamiyo is measured
            "TAMIYO_WARMUP_EPOCHS": "1",
            "TAMIYO_PATIENCE": "1",
            "TAMIYO_LOG_LEVEL": "WARNING",
        }
        with ServiceProcess("tamiyo", port_env="TAMIYO_PORT", env=env):
            total = JOBS + WARMUP_JOBS
            seen = asyncio.run(
                measure(server.url, f"{PREFIX}:control", f"{PREFIX}:telemetry", total)
            )
            decisions = decision_latencies(server.url, seen)
        echoed = asyncio.run(measure(server.url, f"{PREFIX}:echo", f"{PREFIX}:echo", 2 * total))
    baseline = [arrived - envelope["ts"] for arrived, envelope in echoed[2 * WARMUP_JOBS :]]
    figures = {
        "decision_p50_ms": percentile(decisions, 50) * 1e3,
        "decision_p99_ms": percentile(decisions, 99) * 1e3,
        "baseline_p50_ms": percentile(baseline, 50) * 1e3,
        "baseline_p99_ms": percentile(baseline, 99) * 1e3,
    }
    figures["p99_ratio"] = figures["decision_p99_ms"] / figures["baseline_p99_ms"]
    line = " ".join(f"{k}={v:.2f}" for k, v in figures.items())
    print(
        f"tamiyo: {line} decisions={len(decisions)} reports_per_s={RATE_HZ} "
        "(target: decision_p99_ms ≤ 50)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--publish"]:
        publish(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()

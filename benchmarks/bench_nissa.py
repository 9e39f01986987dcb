"""Nissa figures against a real Nissa process and a real redis-server, with a baseline in the same
run:

- `/metrics` scrape time (a full GET over HTTP, body read) while Nissa tracks 10 running and 100
  finished jobs (3 layers × 2 seed slots, 20 epochs of curves, step reports, decisions and
  transitions each) and the running jobs keep reporting (50 telemetry reports/s, as 10 jobs
  reporting every 5 steps would), p50 and p99 (target p99 ≤ 50 ms);
- the baseline: `/healthz` round trips on the same connection, interleaved with the scrapes, so
  both see the same machine; the figure is the ratio of the two p50s.

Prints one line of figures at the end.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

import httpx
import redis

from _timing import percentile
from esper.contracts import (
    ControlDecision,
    DecisionTaken,
    Envelope,
    HostSignature,
    JobStatusChanged,
    KernelReady,
    Message,
    SeedStats,
    SeedTransition,
    TelemetryReport,
)
from esper.testing import RedisServer, ServiceProcess

RUNNING, FINISHED = 10, 100
EPOCHS, STEPS_PER_EPOCH, EVERY = 20, 50, 5
LAYERS, SEEDS = 3, 2
SCRAPES = 400
LOAD_HZ = 50
PREFIX = "bench"


def kernel_id(job: int, layer: int) -> str:
    return f"krn_{job:012x}{layer:012x}"


def seeds(job: int, epoch: int) -> list[SeedStats]:
    """Seed 0 of each layer ACTIVE from epoch 5 on, seed 1 ramping in from epoch 10."""
    out = []
    for layer in range(LAYERS):
        if epoch >= 5:
            out.append(
                SeedStats(
                    layer=f"layers.{layer}",
                    seed=0,
                    state="ACTIVE",
                    alpha=min(1.0, (epoch - 4) / 5),
                    kernel_id=kernel_id(job, layer),
                    contribution=0.01 * layer,
                )
            )
        if epoch >= 10:
            out.append(SeedStats(layer=f"layers.{layer}", seed=1, state="ACTIVE", alpha=0.5))
    return out


def job_messages(job: int, t0: float, finished: bool) -> list[tuple[Message, float]]:
    job_id = f"bench-job-{job}"
    messages: list[tuple[Message, float]] = [
        (JobStatusChanged(job_id=job_id, status="RUNNING", previous="PENDING"), t0)
    ]
    t = t0
    for epoch in range(EPOCHS):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH, EVERY):
            t += 0.05
            report = TelemetryReport(
                job_id=job_id,
                epoch=epoch,
                step=step,
                kind="step",
                train_loss=1.0 / (1 + step),
                seeds=seeds(job, epoch),
            )
            messages.append((report, t))
        t += 0.2
        report = TelemetryReport(
            job_id=job_id,
            epoch=epoch,
            step=(epoch + 1) * STEPS_PER_EPOCH,
            kind="epoch",
            train_loss=1.0 / (2 + epoch),
            val_loss=1.1 / (2 + epoch),
            val_accuracy=min(1.0, 0.5 + epoch / 50),
            samples_per_s=10_000.0,
            seeds=seeds(job, epoch),
        )
        messages.append((report, t))
        if epoch == 4:
            for layer in range(LAYERS):
                messages.extend(germination(job_id, job, layer, t))
    if finished:
        messages.append((JobStatusChanged(job_id=job_id, status="SUCCEEDED"), t + 1))
    return messages


def germination(job_id: str, job: int, layer: int, t: float) -> list[tuple[Message, float]]:
    decision_id = f"dec-{job}-{layer}"
    name = f"layers.{layer}"
    host = HostSignature(kind="linear", in_features=64, out_features=64)
    kernel = KernelReady(
        kernel_id=kernel_id(job, layer),
        name="low_rank",
        blueprint="low_rank",
        format="export",
        host=host,
        digest="sha256:" + "ab" * 32,
        params=1024,
        flops=2048,
    )
    out: list[tuple[Message, float]] = [
        (
            ControlDecision(
                decision_id=decision_id,
                job_id=job_id,
                action="germinate",
                layer=name,
                blueprint="low_rank",
                reason="plateau",
            ),
            t,
        ),
        (kernel, t + 0.01),
    ]
    for a, b in [("DORMANT", "ALLOCATED"), ("ALLOCATED", "LOADING"), ("LOADING", "ACTIVE")]:
        transition = SeedTransition(
            job_id=job_id, layer=name, seed=0, from_state=a, to_state=b, reason="bench"
        )
        out.append((transition, t + 0.02))
    taken = DecisionTaken(
        decision_id=decision_id,
        job_id=job_id,
        action="germinate",
        outcome="applied",
        reason="loaded",
        layer=name,
        seed=0,
    )
    out.append((taken, t + 0.1))
    return out


def publish(client: redis.Redis, messages: list[tuple[Message, float]]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, (message, ts) in enumerate(messages):
        envelope = Envelope.wrap(message, source="bench").model_copy(update={"ts": ts})
        pipe.xadd(f"{PREFIX}:{message.TOPIC}", {"envelope": envelope.encode()})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def feed(url: str, nissa: str) -> int:
    client = redis.Redis.from_url(url)
    t0 = time.time() - 600
    total = 0
    for job in range(RUNNING + FINISHED):
        messages = job_messages(job, t0 + job, finished=job >= RUNNING)
        publish(client, messages)
        total += len(messages)
    client.close()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = httpx.get(f"{nissa}/metrics", timeout=30).text
        done = f'esper_jobs{{status="SUCCEEDED"}} {float(FINISHED)}' in text
        if done and f'esper_job_epoch{{job_id="bench-job-{RUNNING - 1}"}} {float(EPOCHS)}' in text:
            return total
        time.sleep(0.5)
    raise RuntimeError("Nissa did not take in the fed jobs within 180 s")


class Load(threading.Thread):
    """The running jobs keep reporting while Nissa is scraped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        step = EPOCHS * STEPS_PER_EPOCH
        start = time.perf_counter()
        while not self.stop.is_set():
            job = self.sent % RUNNING
            step += 1 if job == 0 else 0
            report = TelemetryReport(
                job_id=f"bench-job-{job}",
                epoch=EPOCHS,
                step=step,
                kind="step",
                train_loss=0.1,
                seeds=seeds(job, EPOCHS),
            )
            envelope = Envelope.wrap(report, source="bench")
            self.client.xadd(f"{PREFIX}:telemetry", {"envelope": envelope.encode()})
            self.sent += 1
            # paced against the clock: no drift
            time.sleep(max(0.0, start + self.sent / LOAD_HZ - time.perf_counter()))
        self.client.close()


def measure(nissa: str) -> dict[str, Any]:
    scrape_ms: list[float] = []
    health_ms: list[float] = []
    with httpx.Client(base_url=nissa, timeout=30) as client:

        def timed(path: str) -> tuple[float, int]:
            start = time.perf_counter()
            response = client.get(path)
            body = response.content
            elapsed = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            return elapsed, len(body)

        for _ in range(20):  # warm-up
            timed("/metrics")
            timed("/healthz")
        size = 0
        for r in range(SCRAPES):
            order = ("/metrics", "/healthz") if r % 2 == 0 else ("/healthz", "/metrics")
            for path in order:
                ms, n = timed(path)
                if path == "/metrics":
                    scrape_ms.append(ms)
                    size = n
                else:
                    health_ms.append(ms)
            time.sleep(0.005)
        samples = sum(
            1 for line in client.get("/metrics").text.splitlines() if line[:1] not in ("#", "")
        )
    return {
        "scrape_p50_ms": percentile(scrape_ms, 50),
        "scrape_p99_ms": percentile(scrape_ms, 99),
        "healthz_p50_ms": percentile(health_ms, 50),
        "healthz_p99_ms": percentile(health_ms, 99),
        "scrape_to_healthz_p50_ratio": percentile(scrape_ms, 50) / percentile(health_ms, 50),
        "samples": samples,
        "body_kib": size / 1024,
    }


def main() -> None:
    with RedisServer() as server, tempfile.TemporaryDirectory() as data:
        env = {
            "ESPER_BUS_REDIS_URL": server.url,
            "ESPER_BUS_PREFIX": PREFIX,
            "NISSA_DATA_DIR": data,
            "NISSA_LOG_LEVEL": "WARNING",
            "NISSA_HEARTBEAT_INTERVAL_S": "1",
        }
        with ServiceProcess("nissa", port_env="NISSA_PORT", env=env) as nissa:
            fed = feed(server.url, nissa.url)
            print(f"fed {fed} messages for {RUNNING} running and {FINISHED} finished jobs")
            load = Load(server.url)
            load.start()
            figures = measure(nissa.url)
            load.stop.set()
            load.join()
    line = " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"nissa: {line} (target: scrape_p99_ms ≤ 50 with {RUNNING} running, {FINISHED} finished)")


if __name__ == "__main__":
    main()

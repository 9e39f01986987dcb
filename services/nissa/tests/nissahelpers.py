"""Helpers of Nissa's tests (imported by name: conftest puts this directory on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from esper.contracts import Envelope, Message

DEADLINE_S = 20.0


def poll(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """`check()` until it returns something truthy (returned), or fail after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Scrape:
    """One `/metrics` response, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples.append(Sample(s.name, dict(s.labels), s.value))

    @property
    def names(self) -> set[str]:
        """Names of every sample (with `_total`, `_bucket`, … as exposed)."""
        return {s.name for s in self.samples}

    def of(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample that matches, None when none does."""
        found = self.of(name, **labels)
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples: {found}"
        return found[0].value if found else None

    def label_values(self, label: str, prefix: str = "esper_") -> set[str]:
        return {
            s.labels[label] for s in self.samples if s.name.startswith(prefix) and label in s.labels
        }


def scrape(url: str) -> Scrape:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


class Bus:
    """Publishes to the streams as a service would: one `envelope` field per entry."""

    def __init__(self, url: str, prefix: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    def stream(self, topic: str) -> str:
        return f"{self.prefix}:{topic}"

    def publish(self, message: Message, *, ts: float | None = None, source: str = "test") -> str:
        envelope = Envelope.wrap(message, source=source)
        if ts is not None:
            envelope = envelope.model_copy(update={"ts": ts})
        return self.raw(message.TOPIC, envelope.encode())

    def publish_all(self, messages: list[tuple[Message, float]], source: str = "test") -> None:
        """(message, ts) pairs in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for message, ts in messages:
            envelope = Envelope.wrap(message, source=source).model_copy(update={"ts": ts})
            pipe.xadd(self.stream(message.TOPIC), {"envelope": envelope.encode()})
        pipe.execute()

    def raw(self, topic: str, envelope: bytes | str, field: str = "envelope") -> str:
        entry = self.redis.xadd(self.stream(topic), {field: envelope})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def handled(url: str, topic: str, at_least: float) -> Callable[[], Scrape | None]:
    """A poll check: Nissa consumed at least `at_least` messages of `topic`."""

    def check() -> Scrape | None:
        metrics = scrape(url)
        total = sum(s.value for s in metrics.of("esper_bus_messages_total", topic=topic))
        return metrics if total >= at_least else None

    return check


KERNEL = "krn_00112233445566778899aabb"
KERNEL_PARAMS = 120


def job_story(job_id: str, t0: float, kernel: str = KERNEL) -> list[tuple[Message, float]]:
    """A realistic job, as Tolaria, Tamiyo and Urza would publish it, with send times from `t0`:
    queued, RUNNING, three epochs (14 steps each, step reports every 5 steps, 0.1 s a step), a
    germinate decision after epoch 0 answered 0.4 s later, the seed's transitions to ACTIVE, its
    contribution measured at the end of epochs 1 and 2, SUCCEEDED."""
    from esper.contracts import (
        ControlDecision,
        DecisionTaken,
        HostSignature,
        JobQueued,
        JobStatusChanged,
        KernelReady,
        SeedStats,
        SeedTransition,
        TelemetryReport,
    )

    def step(epoch: int, n: int, at: float, seeds: list[SeedStats] | None = None) -> Any:
        report = TelemetryReport(
            job_id=job_id,
            epoch=epoch,
            step=n,
            kind="step",
            train_loss=1.0 - n / 100,
            seeds=seeds or [],
        )
        return (report, t0 + at)

    def epoch_end(epoch: int, n: int, at: float, loss: float, acc: float, seeds: Any) -> Any:
        report = TelemetryReport(
            job_id=job_id,
            epoch=epoch,
            step=n,
            kind="epoch",
            train_loss=loss,
            val_loss=loss + 0.05,
            val_accuracy=acc,
            samples_per_s=500.0 + epoch,
            seeds=seeds,
        )
        return (report, t0 + at)

    def seed(state: str, alpha: float, contribution: float | None = None) -> list[SeedStats]:
        return [
            SeedStats(
                layer="2",
                seed=0,
                state=state,
                alpha=alpha,
                kernel_id=kernel,
                contribution=contribution,
            )
        ]

    def transition(a: str, b: str, n: int, at: float) -> Any:
        event = SeedTransition(
            job_id=job_id,
            layer="2",
            seed=0,
            from_state=a,
            to_state=b,
            reason=f"{a}→{b}",
            kernel_id=kernel,
            step=n,
            occurred_at=t0 + at,
        )
        return (event, t0 + at)

    decision_id = f"dec-{job_id}"
    host = HostSignature(kind="linear", in_features=8, out_features=8)
    return [
        (JobQueued(job_id=job_id), t0),
        (JobStatusChanged(job_id=job_id, status="RUNNING", previous="PENDING"), t0 + 0.5),
        step(0, 0, 1.0),
        step(0, 5, 1.5),
        step(0, 10, 2.0),
        epoch_end(0, 14, 2.6, 0.69, 0.55, []),
        (
            ControlDecision(
                decision_id=decision_id,
                job_id=job_id,
                action="germinate",
                layer="2",
                blueprint="wide_mlp",
                alpha=1.0,
                ramp_steps=10,
                reason="plateau",
            ),
            t0 + 2.7,
        ),
        (
            KernelReady(
                kernel_id=kernel,
                name="wide_mlp",
                blueprint="wide_mlp",
                format="export",
                host=host,
                digest="sha256:" + "cd" * 32,
                params=KERNEL_PARAMS,
                flops=1000,
            ),
            t0 + 2.8,
        ),
        transition("DORMANT", "ALLOCATED", 14, 2.9),
        transition("ALLOCATED", "LOADING", 14, 2.95),
        transition("LOADING", "ACTIVE", 14, 3.0),
        (
            DecisionTaken(
                decision_id=decision_id,
                job_id=job_id,
                action="germinate",
                outcome="applied",
                reason="loaded into seed 0",
                layer="2",
                seed=0,
            ),
            t0 + 3.1,
        ),
        step(1, 15, 3.2, seed("ACTIVE", 0.1)),
        step(1, 20, 3.7, seed("ACTIVE", 0.6)),
        step(1, 25, 4.2, seed("ACTIVE", 1.0)),
        epoch_end(1, 28, 4.8, 0.5, 0.7, seed("ACTIVE", 1.0, 0.05)),
        epoch_end(2, 42, 6.0, 0.4, 0.8, seed("ACTIVE", 1.0, 0.08)),
        (JobStatusChanged(job_id=job_id, status="SUCCEEDED", previous="RUNNING"), t0 + 6.1),
    ]


STORY_STEP_SECONDS = 2.0
"""Step time the story implies: 4 same-epoch intervals of 5 steps × 0.1 s."""
STORY_STEPS_TIMED = 20

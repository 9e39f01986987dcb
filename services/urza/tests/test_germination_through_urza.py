"""A training job's germination while Urza is away: the SeedOrchestrator as Tolaria runs it (Urza
as the kernel provider, the tiered kernel cache behind the model) against a real Urza process
that is stopped during the decision.

Urza back within the decision's `kernel_retry_s`: the growth is applied. Away for longer: refused
as `kernel_unreachable`, a refusal the controller may decide again after. A failure that would
repeat (an unknown blueprint) is refused at once, without a retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.client import UrzaClient
from esper.contracts import ControlDecision, HostSignature
from esper.contracts.envelope import Message
from esper.contracts.events import SeedTransition
from esper.contracts.jobs import MorphogenesisSpec
from esper.kasmina import SeedState
from esper.kernels import tiered_cache
from esper.testing import ServiceProcess
from esper.training import SeedOrchestrator

JOB = "job-urza-away"
AWAY_S = 2.0


@pytest.fixture(scope="module")
def urza_away(urza_module_factory: Callable[..., ServiceProcess]) -> ServiceProcess:
    """An Urza of this module's own, which the tests stop and start."""
    return urza_module_factory()


@pytest.fixture
def running(urza_away: ServiceProcess) -> Iterator[ServiceProcess]:
    urza_away.start()  # a test before may have left it stopped
    yield urza_away
    urza_away.start()


@dataclass
class Job:
    morphable: esper.MorphableModel
    orchestrator: SeedOrchestrator
    urza: UrzaClient
    emitted: list[Message] = field(default_factory=list)

    def transitions(self) -> list[tuple[str, str]]:
        return [(m.from_state, m.to_state) for m in self.emitted if isinstance(m, SeedTransition)]


@pytest.fixture
async def make_job(
    running: ServiceProcess, token: str, signing_key: bytes
) -> AsyncIterator[Callable[..., Job]]:
    clients: list[UrzaClient] = []

    def make(**spec: Any) -> Job:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        cache = tiered_cache(urza_url=running.url, urza_token=token, signing_key=signing_key)
        morphable = esper.wrap(model, seeds_per_layer=2, kernels=cache)
        urza = UrzaClient(running.url, token=token)
        clients.append(urza)
        emitted: list[Message] = []
        orchestrator = SeedOrchestrator(
            morphable, JOB, urza, MorphogenesisSpec(ramp_steps=0, **spec), emitted.append
        )
        orchestrator.attach()
        return Job(morphable, orchestrator, urza, emitted)

    yield make
    for client in clients:
        await client.aclose()


def germinate(**fields: Any) -> ControlDecision:
    fields.setdefault("blueprint", "low_rank")
    return ControlDecision(
        decision_id=f"d-{time.monotonic_ns()}",
        job_id=JOB,
        action="germinate",
        layer="0",
        reason="test",
        **fields,
    )


def back_after(urza: ServiceProcess, delay_s: float) -> threading.Thread:
    """Start Urza again `delay_s` from now, from another thread (start() waits until ready)."""

    def restart() -> None:
        time.sleep(delay_s)
        urza.start()

    thread = threading.Thread(target=restart, name="urza-restart", daemon=True)
    thread.start()
    return thread


async def test_urza_back_within_the_deadline_the_germination_is_applied(
    make_job: Callable[..., Job], running: ServiceProcess
) -> None:
    job = make_job(kernel_retry_s=120.0)  # a bound far above Urza's restart, not a wait
    running.stop()
    restart = back_after(running, AWAY_S)
    began = time.monotonic()

    answer = await job.orchestrator.execute(germinate(), step=0, epoch=0)

    restart.join(timeout=120)
    assert answer.outcome == "applied", answer.reason
    assert time.monotonic() - began >= AWAY_S  # it did wait for Urza: there was an outage
    info = job.morphable.seeds("0")[answer.seed or 0]
    assert info.state is SeedState.ACTIVE and info.alpha == 1.0
    assert job.transitions() == [
        ("DORMANT", "ALLOCATED"),
        ("ALLOCATED", "LOADING"),
        ("LOADING", "ACTIVE"),
    ]


async def test_urza_away_while_the_kernel_is_fetched_the_fetch_is_retried(
    make_job: Callable[..., Job], running: ServiceProcess
) -> None:
    """The kernel exists (compiled before), but Urza is down when the job fetches it: the tiered
    cache's own retries and circuit breaker give up quickly, the orchestrator keeps trying until
    Urza is back, and the slot never sees a failed load."""
    job = make_job(kernel_retry_s=120.0)
    host = HostSignature.of(job.morphable.layer("0").base_layer)
    kernel_id = await job.urza.kernel_for("low_rank", host, "export")
    running.stop()
    restart = back_after(running, AWAY_S)

    answer = await job.orchestrator.execute(
        germinate(blueprint=None, kernel=kernel_id), step=0, epoch=0
    )

    restart.join(timeout=120)
    assert answer.outcome == "applied", answer.reason
    assert job.morphable.seeds("0")[0].kernel_id == kernel_id
    assert job.transitions() == [
        ("DORMANT", "ALLOCATED"),
        ("ALLOCATED", "LOADING"),
        ("LOADING", "ACTIVE"),
    ]


async def test_urza_away_past_the_deadline_is_refused_as_transient(
    make_job: Callable[..., Job], running: ServiceProcess
) -> None:
    job = make_job(kernel_retry_s=2.0)
    running.stop()

    answer = await job.orchestrator.execute(germinate(), step=0, epoch=0)

    assert answer.outcome == "refused"
    assert answer.code == "kernel_unreachable" and answer.transient, answer.reason
    assert "no kernel for blueprint 'low_rank'" in answer.reason
    assert "unreachable for" in answer.reason and "attempts" in answer.reason
    assert all(s.state is SeedState.DORMANT for s in job.morphable.seeds())
    assert job.transitions() == []  # the slot was never touched
    assert job.emitted[-1] == answer


async def test_a_permanent_failure_is_refused_at_once(
    make_job: Callable[..., Job], caplog: pytest.LogCaptureFixture
) -> None:
    job = make_job(kernel_retry_s=120.0)
    with caplog.at_level(logging.WARNING, logger="esper.training.orchestrator"):
        answer = await job.orchestrator.execute(
            germinate(blueprint="no_such_blueprint"), step=0, epoch=0
        )
    assert answer.outcome == "refused"
    assert answer.code == "kernel_unavailable" and not answer.transient, answer.reason
    assert "no_such_blueprint" in answer.reason
    assert not [r for r in caplog.records if "again in" in r.getMessage()]  # not retried

"""The controller on a real Redis: telemetry and events in through the bus, decisions out on the
control stream, state in Redis. Idempotence, duplicates, two replicas, a restart."""

from __future__ import annotations

import time

import redis as sync_redis
from tamiyo_helpers import FAST, Harness, on_the_wire, report, running, seed, taken, until

from esper.bus import Delivery
from esper.contracts import ControlDecision, Envelope
from esper.policy.config import PolicyConfig
from esper.policy.models import JobState
from tamiyo.controller import Controller, derive_decision_id
from tamiyo.store import Change, TamiyoStore


async def flat_job(h: Harness, job_id: str, epochs: range) -> list[Envelope]:
    return [await h.send(report(job_id, e, 0.69)) for e in epochs]


async def decisions_of(h: Harness, job_id: str, n: int = 1) -> list[ControlDecision]:
    async def enough() -> list[ControlDecision] | None:
        found = [d for _, d in await h.control() if d.job_id == job_id]
        return found if len(found) >= n else None

    return list(await until(enough))


async def settle(h: Harness, job_id: str, last_epoch: int) -> JobState:
    """Wait until the job's state has seen `last_epoch`."""

    async def seen() -> JobState | None:
        state = await h.state(job_id)
        return state if state is not None and state.last_epoch == last_epoch else None

    result: JobState = await until(seen)
    return result


# ---------------------------------------------------------------------------------------------
async def test_a_plateau_gives_one_valid_decision_tied_to_its_trigger(harness: Harness) -> None:
    harness.controller()
    sent = await flat_job(harness, "job-a", range(4))
    [decision] = await decisions_of(harness, "job-a")
    await settle(harness, "job-a", 3)
    [(envelope, _)] = await harness.control()
    trigger = sent[2]  # warm-up 2, patience 2: epoch 2 is the second epoch without a new best
    assert envelope.source == "tamiyo" and envelope.correlation_id == trigger.id
    assert decision.decision_id == derive_decision_id("job-a", trigger.id, 0)
    assert (decision.action, decision.layer, decision.seed) == ("germinate", "2", None)
    assert decision.blueprint == "residual_mlp" and decision.evidence["trigger"] == trigger.id
    state = await harness.state("job-a")
    assert state is not None and state.pending is not None
    assert state.pending.decision_id == decision.decision_id
    record = await harness.running[0].store.decision(decision.decision_id)
    assert record is not None and record.source == "tamiyo" and record.outcome == "published"


async def test_a_redelivered_trigger_publishes_nothing_new(harness: Harness) -> None:
    """The consumer died after the decision was written, before its ack: the same entry is
    handled again. The state written with the decision says the report was handled."""
    controller = harness.controller(start=False)
    for epoch in range(3):
        message = report("job-b", epoch, 0.69)
        envelope = Envelope.wrap(on_the_wire(message), source="tolaria")
        delivery = Delivery(envelope, message, "telemetry", "s", f"{epoch}-0", 1, "tamiyo", "c")
        await controller._on_report(delivery)
    await controller._on_report(delivery)  # the redelivery of epoch 2, the trigger
    again = Delivery(envelope, message, "telemetry", "s", "2-0", 2, "tamiyo", "c")
    await controller._on_report(again)
    [(_, decision)] = await harness.control()
    assert decision.decision_id == derive_decision_id("job-b", envelope.id, 0)
    await controller.store.redis.aclose()


async def test_duplicate_and_late_telemetry_is_ignored(harness: Harness) -> None:
    harness.controller()
    await flat_job(harness, "job-c", range(3))
    await decisions_of(harness, "job-c")
    await harness.send(report("job-c", 2, 0.69))  # the trigger again, in a new envelope
    await harness.send(report("job-c", 1, 0.10))  # late, and would be a new best
    await harness.send(report("job-c", 3, 0.69))
    state = await settle(harness, "job-c", 3)
    assert state.best_val_loss == 0.69  # the late 0.10 never counted
    assert len([d for _, d in await harness.control() if d.job_id == "job-c"]) == 1


async def test_a_job_first_seen_mid_training_gets_nothing_until_it_is_seen_running(
    harness: Harness,
) -> None:
    harness.controller()
    await flat_job(harness, "job-d", range(5, 10))
    state = await settle(harness, "job-d", 9)
    assert not state.known and "unknown job" in state.note
    await harness.send(running("job-d"))
    await harness.send(report("job-d", 10, 0.69))
    [decision] = await decisions_of(harness, "job-d")
    assert decision.action == "germinate"


async def test_an_old_report_is_recorded_but_not_acted_on(harness: Harness) -> None:
    """A backlog read after an outage: the job has moved on since these were sent."""
    harness.controller()
    for epoch in range(4):
        envelope = Envelope.wrap(on_the_wire(report("job-old", epoch, 0.69)), source="tolaria")
        await harness.producer.publish(envelope.model_copy(update={"ts": time.time() - 3600}))
    state = await settle(harness, "job-old", 3)
    assert state.stale_epochs == 3 and "s old: recorded only" in state.note
    await harness.send(report("job-old", 4, 0.69))  # fresh: the plateau it shows is acted on
    [decision] = await decisions_of(harness, "job-old")
    assert decision.action == "germinate"


async def test_a_report_that_asks_nothing_is_never_decided_on(harness: Harness) -> None:
    """A job that decides at points but did not ask (a fixed schedule's, or its last epoch):
    the same plateau that gets a v1 job a germination gets it nothing — a decision sent unasked
    would reach the job as an operator's."""
    harness.controller()
    for epoch in range(5):
        envelope = Envelope.wrap(report("job-asks-nothing", epoch, 0.69), source="tolaria")
        assert envelope.version == 3
        await harness.producer.publish(envelope)
    state = await settle(harness, "job-asks-nothing", 4)
    assert "asks nothing: recorded only" in state.note and state.stale_epochs == 4
    await flat_job(harness, "job-v1", range(5))  # the control: v1 reports of the same job
    [decision] = await decisions_of(harness, "job-v1")
    assert decision.action == "germinate"
    assert [d for _, d in await harness.control() if d.job_id == "job-asks-nothing"] == []


async def test_events_of_a_job_never_seen_create_no_state(harness: Harness) -> None:
    harness.controller()
    await harness.send(taken("job-ghost", "tmy-nothing", "applied"))
    await harness.send(running("job-marker"))
    await until(lambda: harness.state("job-marker"))
    assert await harness.state("job-ghost") is None


async def test_two_replicas_never_decide_twice(harness: Harness) -> None:
    """Two controllers share the group; every report is sent twice (as a producer retry that
    re-wrapped it would), so copies of one job's reports are handled by both at once."""
    first, second = harness.controller(), harness.controller()
    jobs = [f"job-r{i}" for i in range(12)]
    for epoch in range(5):
        for job in jobs:
            message = report(job, epoch, 0.69)
            for _ in range(2):
                await harness.send(message)
    for job in jobs:
        await settle(harness, job, 4)
    decisions = [d for _, d in await harness.control()]
    by_job = {job: [d for d in decisions if d.job_id == job] for job in jobs}
    assert all(len(found) == 1 for found in by_job.values()), by_job
    assert len({d.decision_id for d in decisions}) == len(decisions)

    async def all_handled() -> bool:  # counted once acked, which trails the handling a little
        return first.consumer.stats.handled + second.consumer.stats.handled == len(jobs) * 10

    await until(all_handled)


async def test_a_concurrent_write_makes_the_transaction_run_again(
    harness: Harness, redis_url: str
) -> None:
    """Compare-and-set: a state written by someone else between our read and our write fails
    our EXEC; the computation runs again on the fresh state."""
    store = TamiyoStore(harness.redis, harness.bus, FAST)
    other = sync_redis.Redis.from_url(redis_url)
    seen: list[int] = []

    def mutate(state: JobState | None, config: PolicyConfig) -> Change:
        seen.append(state.version if state else 0)
        if len(seen) == 1:  # another replica writes right now
            other.set(
                store.state_key("job-e"), JobState(job_id="job-e", version=7).model_dump_json()
            )
        fresh = state or JobState(job_id="job-e")
        fresh.note = "mine"
        return Change(fresh)

    change = await store.transact("job-e", mutate)
    assert seen == [0, 7] and store.conflicts == 1
    assert change is not None and change.state.version == 8
    other.close()


async def test_a_restarted_controller_carries_on_from_the_state_in_redis(
    harness: Harness,
) -> None:
    first = harness.controller()
    await flat_job(harness, "job-f", range(3))
    [germinate] = await decisions_of(harness, "job-f")
    await harness.stop(first)  # a crash or a deploy: the next one starts from Redis
    harness.controller()
    await harness.send(taken("job-f", germinate.decision_id, "applied", slot=1))

    async def adopted() -> bool:
        state = await harness.state("job-f")
        return state is not None and state.pending is None and bool(state.seeds)

    await until(adopted)
    for epoch in (3, 4):
        await harness.send(report("job-f", epoch, 0.5, seeds=[seed("2", 1, contribution=0.3)]))
    verdict = (await decisions_of(harness, "job-f", n=2))[1]
    assert (verdict.action, verdict.layer, verdict.seed) == ("keep", "2", 1)
    assert verdict.evidence["contribution"] == 0.3
    record = await harness.running[0].store.decision(germinate.decision_id)
    assert record is not None and (record.outcome, record.slot) == ("applied", 1)


async def test_a_refusal_is_recorded_and_charged_to_the_blueprint(harness: Harness) -> None:
    harness.controller()
    await flat_job(harness, "job-g", range(3))
    [germinate] = await decisions_of(harness, "job-g")
    await harness.send(
        taken(
            "job-g",
            germinate.decision_id,
            "refused",
            slot=None,
            reason="compile failed",
            code="kernel_unavailable",
        )
    )

    async def refused() -> JobState | None:
        state = await harness.state("job-g")
        return state if state is not None and state.pending is None else None

    state = await until(refused)
    assert state.blueprints["residual_mlp"].failures == 1
    record = await harness.running[0].store.decision(germinate.decision_id)
    assert record is not None and record.outcome == "refused"
    assert record.outcome_reason == "compile failed"


async def test_a_malformed_report_is_dead_lettered_not_decided_on(harness: Harness) -> None:
    controller = harness.controller()
    bad = Envelope.wrap(report("job-h", 0), source="tolaria").model_copy(
        update={"payload": {**report("job-h", 0).model_dump(mode="json"), "epoch": -1}}
    )
    await harness.producer.publish_raw([bad.encode()], "telemetry")
    await until(lambda: _dead(controller))
    assert await harness.state("job-h") is None
    assert await harness.control() == []


async def _dead(controller: Controller) -> bool:
    return controller.consumer.stats.dead_lettered == 1

"""Decision points on a real Redis: a report marked `decision_point` gets exactly one
control.answer, with the policy's decisions or an explicit nothing; asked again, the same answer;
and the answers do not depend on when the job's events arrive next to its reports."""

from __future__ import annotations

from typing import Any

from tamiyo_helpers import (
    Harness,
    as_v1,
    as_v2,
    handle,
    report,
    seed,
    taken,
    transition,
    until,
)

from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionTaken,
    Message,
    TelemetryReport,
)
from esper.policy.tracking import MAX_ANSWERS
from tamiyo.controller import derive_decision_id


async def answers_of(h: Harness, job_id: str, n: int) -> list[ControlAnswer]:
    async def enough() -> list[ControlAnswer] | None:
        found = await h.answers(job_id)
        return found if len(found) >= n else None

    return list(await until(enough))


# ---------------------------------------------------------------------------------------------
async def test_a_decision_point_gets_one_answer_carrying_the_decisions(harness: Harness) -> None:
    harness.controller()
    for epoch in range(3):
        await harness.send(report("job-pa", epoch, 0.69, point=True))
    answers = await answers_of(harness, "job-pa", 3)
    assert [a.point for a in answers] == ["epoch:0:10", "epoch:1:20", "epoch:2:30"]
    assert [len(a.decisions) for a in answers] == [0, 0, 1]
    [germinate] = answers[2].decisions
    # Warm-up 2, patience 2: epoch 2 is the second report without a new best.
    assert (germinate.action, germinate.layer, germinate.blueprint) == (
        "germinate",
        "2",
        "residual_mlp",
    )
    assert germinate.decision_id == derive_decision_id("job-pa", "point:epoch:2:30", 0)
    assert germinate.evidence["trigger"] == "point:epoch:2:30"
    assert germinate.reason in answers[2].note
    assert await harness.control() == []  # the decision travels in the answer only
    record = await harness.running[0].store.decision(germinate.decision_id)
    assert record is not None and record.trigger == "point:epoch:2:30" and record.epoch == 2

    # The job executed it and says so in its next report; the event on the events stream is
    # not needed for the state nor for the record.
    answer = taken("job-pa", germinate.decision_id, "applied", slot=0)
    await harness.send(
        report("job-pa", 3, 0.69, point=True, answers=[answer], seeds=[seed("2", 0, alpha=0.5)])
    )
    later = (await answers_of(harness, "job-pa", 4))[3]
    assert later.decisions == [] and "in flight" in later.note
    state = await harness.state("job-pa")
    assert state is not None and state.pending is None and state.points
    [track] = state.seeds
    assert (track.decision_id, track.origin, track.blueprint) == (
        germinate.decision_id,
        "tamiyo",
        "residual_mlp",
    )
    record = await harness.running[0].store.decision(germinate.decision_id)
    assert record is not None and (record.outcome, record.slot) == ("applied", 0)


async def test_a_warm_up_point_is_answered_with_nothing_and_says_why(harness: Harness) -> None:
    harness.controller()
    await harness.send(report("job-pb", 0, 0.69, point=True))
    await harness.send(report("job-pb", 1, 0.69, kind="step", step=15, point=True))
    first, second = await answers_of(harness, "job-pb", 2)
    assert first.decisions == [] and first.note.startswith("nothing to do: warming up")
    assert (second.kind, second.step, second.decisions) == ("step", 15, [])
    assert second.note.startswith("nothing to do: step point")


async def test_a_point_asked_again_gets_the_same_answer_and_is_read_once(
    harness: Harness,
) -> None:
    """A job resumed from its checkpoint asks its last point again, in a new envelope."""
    harness.controller()
    for epoch in range(3):
        await harness.send(report("job-pc", epoch, 0.69, point=True))
    await answers_of(harness, "job-pc", 3)
    before = await harness.state("job-pc")
    again = await harness.send(report("job-pc", 2, 0.69, point=True))
    answers = await answers_of(harness, "job-pc", 4)
    assert answers[3] == answers[2] and len(answers[3].decisions) == 1
    [(envelope, _)] = [(e, m) for e, m in await harness.entries() if e.correlation_id == again.id]
    assert envelope.type == "control.answer"
    after = await harness.state("job-pc")
    assert before is not None and after is not None
    ignored = {"version", "updated_at"}
    assert after.model_dump(exclude=ignored) == before.model_dump(exclude=ignored)
    assert after.germinations == 1 and after.stale_epochs == 0 and after.last_epoch == 2
    records, _ = await harness.running[0].store.decisions("job-pc", 10)
    assert len(records) == 1


async def test_a_point_whose_answer_is_no_longer_kept_gets_nothing_and_says_so(
    harness: Harness,
) -> None:
    controller = harness.controller(start=False)
    epochs = MAX_ANSWERS + 2
    for epoch in range(epochs):
        await handle(controller, report("job-pd", epoch, 0.69 - 0.02 * epoch, point=True))
    state = await harness.state("job-pd")
    assert state is not None and len(state.answers) == MAX_ANSWERS
    assert next(iter(state.answers)) == "epoch:2:30"  # the oldest two were let go
    await handle(controller, report("job-pd", 0, 0.69, point=True))
    answer = (await harness.answers("job-pd"))[-1]
    assert answer.point == "epoch:0:10" and answer.decisions == []
    assert "no answer to it is kept" in answer.note
    after = await harness.state("job-pd")
    assert (
        after is not None
        and after.last_epoch == epochs - 1
        and after.best_val_loss == (state.best_val_loss)
    )
    await controller.store.redis.aclose()


async def test_an_old_point_is_answered_all_the_same(harness: Harness) -> None:
    """A backlog of points (Tamiyo was away): the job may still be waiting, and decides itself
    whether an answer came in time, so each point is answered and the note says how late."""
    controller = harness.controller(start=False)
    for epoch in range(3):
        await handle(controller, report("job-pg", epoch, 0.69, point=True), age_s=3600)
    answers = await harness.answers("job-pg")
    assert [len(a.decisions) for a in answers] == [0, 0, 1]
    assert all("s after it was sent" in a.note for a in answers)
    await controller.store.redis.aclose()


async def test_a_job_at_points_decides_only_there(harness: Harness) -> None:
    """Its other reports (sampled steps, the last epoch's) and its seeds' transitions arrive at
    times that depend on load: they decide nothing and change nothing the policy reads."""
    controller = harness.controller(start=False)
    for epoch in range(2):
        await handle(controller, report("job-pe", epoch, 0.69, point=True))
    before = await harness.state("job-pe")
    # The last epoch asks nothing; it would be a plateau.
    await handle(controller, report("job-pe", 2, 0.69, kind="step", step=25))
    await handle(controller, report("job-pe", 2, 0.69))
    await handle(controller, transition("job-pe", "2", 0, "DORMANT", "ALLOCATED", 26))
    after = await harness.state("job-pe")
    assert before is not None and after is not None
    assert after.model_dump() == before.model_dump()
    assert await harness.control() == [] and len(await harness.answers("job-pe")) == 2
    await controller.store.redis.aclose()


async def test_a_v1_report_is_handled_as_before(harness: Harness) -> None:
    harness.controller()
    for epoch in range(3):
        await harness.send(as_v1(report("job-pf", epoch, 0.69)))
    [(envelope, decision)] = await until(harness.control)
    assert decision.action == "germinate" and envelope.correlation_id is not None
    assert decision.decision_id == derive_decision_id("job-pf", envelope.correlation_id, 0)
    state = await harness.state("job-pf")
    assert state is not None and not state.points and state.answers == {}
    assert await harness.answers("job-pf") == []


async def test_a_v2_job_at_points_is_answered_as_before(harness: Harness) -> None:
    """A job from before widening sends v2 reports (layers without `next_layer`): read as v3
    whose layers cannot be widened, its points are answered as a v3 job's are."""
    harness.controller()
    for epoch in range(3):
        await harness.send(as_v2(report("job-pg", epoch, 0.69, point=True)))
    answers = await answers_of(harness, "job-pg", 3)
    assert [len(a.decisions) for a in answers] == [0, 0, 1]
    [germinate] = answers[2].decisions
    assert (germinate.action, germinate.layer) == ("germinate", "2")
    assert germinate.decision_id == derive_decision_id("job-pg", "point:epoch:2:30", 0)


# ---------------------------------------------------------------------------------------------
class Job:
    """A job at epoch points, answering the decisions of each answer as Tolaria does: executed
    before its next step, their answers in its next report and, separately, on the events
    stream with the seeds' transitions. Its 1st germination is refused for want of a slot, its
    2nd dies within the epoch, the others live and contribute 0.2."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.carry: list[DecisionTaken] = []
        self.events: list[Message] = []
        self.live: dict[tuple[str, int], float] = {}
        self.germinations = 0

    def report(self, epoch: int) -> TelemetryReport:
        seeds = [seed(layer, i, contribution=c) for (layer, i), c in self.live.items()]
        carry, self.carry = self.carry, []
        return report(self.job_id, epoch, 0.69, point=True, seeds=seeds, answers=carry)

    def execute(self, decision: ControlDecision, step: int) -> None:
        layer, slot = decision.layer, decision.seed if decision.seed is not None else 0
        edges: list[tuple[str, str]] = []
        answer: dict[str, Any] = {"action": decision.action, "layer_name": layer, "slot": slot}
        if decision.action == "germinate":
            self.germinations += 1
            edges = [("DORMANT", "ALLOCATED"), ("ALLOCATED", "LOADING"), ("LOADING", "ACTIVE")]
            if self.germinations == 1:
                edges = []
                answer.update(outcome="refused", slot=None, code="no_free_slot")
            elif self.germinations == 2:
                edges += [
                    ("ACTIVE", "RETIRING"),
                    ("RETIRING", "RECYCLING"),
                    ("RECYCLING", "DORMANT"),
                ]
            else:
                self.live[(layer, slot)] = 0.2
        elif decision.action == "retire":
            self.live.pop((layer, slot), None)
            edges = [("ACTIVE", "RETIRING"), ("RETIRING", "RECYCLING"), ("RECYCLING", "DORMANT")]
        done = taken(self.job_id, decision.decision_id, reason="done", **answer)
        self.carry.append(done)
        for offset, (a, b) in enumerate(edges):
            self.events.append(transition(self.job_id, layer, slot, a, b, step + offset))
        self.events.append(done)


async def run_job(h: Harness, late: bool, epochs: int = 12) -> list[ControlAnswer]:
    """The same job's points, its events read before the next point (`late` False) or after it."""
    controller = h.controller(start=False)
    job = Job("job-det")
    for epoch in range(epochs):
        point = job.report(epoch)
        events, job.events = job.events, []
        for message in [point, *events] if late else [*events, point]:
            await handle(controller, message)
        answer = (await h.answers(job.job_id))[-1]
        assert answer.point == point.point
        for decision in answer.decisions:
            job.execute(decision, point.step)
    for message in job.events:
        await handle(controller, message)
    await controller.store.redis.aclose()
    return await h.answers(job.job_id)


async def test_the_answers_do_not_depend_on_when_the_events_arrive(harness: Harness) -> None:
    late = Harness(harness.bus.model_copy(update={"prefix": f"{harness.bus.prefix}-late"}))
    try:
        early_answers = await run_job(harness, late=False)
        late_answers = await run_job(late, late=True)
        early_state = await harness.state("job-det")
        late_state = await late.state("job-det")
    finally:
        await late.close()
    assert early_answers == late_answers
    decided = [(a.epoch, d.action, d.layer) for a in early_answers for d in a.decisions]
    # 2: refused for want of a slot, which cools down until after epoch 2 + cooldown_epochs 2
    # (counted from the point the refusal answers, wherever its event falls); 5: dies in its
    # epoch, and the next point, which lists no seed, says it is gone; 7: lives, judged at 9.
    assert [(e, a) for e, a, _ in decided][:4] == [
        (2, "germinate"),
        (5, "germinate"),
        (7, "germinate"),
        (9, "keep"),
    ]
    assert decided[0][2] == "2" and decided[1][2] != "2"  # the full layer is not asked again
    assert early_state is not None and late_state is not None
    ignored = {"version", "updated_at", "created_at"}
    assert early_state.model_dump(exclude=ignored) == late_state.model_dump(exclude=ignored)

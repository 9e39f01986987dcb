"""The fitting rules at decision points, on a real Redis: a growth on a stalled train_loss, a
kept seed judged again, no growth while the job overfits, and growth stopped when it does not
pay — each decided at the same points, with the same notes, whether the job's events are read
before its next point or after it."""

from __future__ import annotations

from tamiyo_helpers import FAST, Harness, handle, report, seed, taken, transition

from esper.contracts import ControlAnswer, ControlDecision, DecisionTaken, Message, TelemetryReport
from esper.policy.config import PolicyConfig

CONFIG = FAST.model_copy(
    update={
        "patience": 3,
        "min_delta": 0.005,
        "cooldown_epochs": 0,
        "max_seeds_per_job": 1,
        "max_unpaid_germinations": 1,
        "rejudge_epochs": 3,
    }
)
EPOCHS = 26


def losses(epoch: int) -> tuple[float, float]:
    """(train_loss, val_loss) of the scripted job: a slow learner (epochs 0–12), then it
    overfits (13–17), then its val_loss falls back and stays flat."""
    if epoch <= 12:
        return 1.4 - 0.005 * epoch, 1.5 - 0.004 * epoch
    if epoch <= 17:
        return 1.34 - 0.05 * (epoch - 12), 1.452 + 0.05 * (epoch - 12)
    return 1.0, 1.3


class ScriptedJob:
    """Answers each answer's decisions as Tolaria does: executed before its next step, their
    answers in its next report and, separately, on the events stream with the seeds'
    transitions. Its 1st seed pays (0.2) for two epochs, then measures 0; the others measure 0."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.carry: list[DecisionTaken] = []
        self.events: list[Message] = []
        self.live: dict[tuple[str, int], int] = {}
        self.germinations = 0

    def report(self, epoch: int) -> TelemetryReport:
        listed = [
            seed(layer, slot, contribution=self.contribution(n, epoch))
            for (layer, slot), n in self.live.items()
        ]
        carry, self.carry = self.carry, []
        train, val = losses(epoch)
        return report(
            self.job_id, epoch, val, train_loss=train, point=True, seeds=listed, answers=carry
        )

    def contribution(self, germination: int, epoch: int) -> float:
        return 0.2 if germination == 1 and epoch <= 7 else 0.0

    def execute(self, decision: ControlDecision, step: int) -> None:
        layer, slot = decision.layer, decision.seed if decision.seed is not None else 0
        if decision.action == "germinate":
            self.germinations += 1
            self.live[(layer, slot)] = self.germinations
            edges = [("DORMANT", "ALLOCATED"), ("ALLOCATED", "LOADING"), ("LOADING", "ACTIVE")]
        elif decision.action == "retire":
            self.live.pop((layer, slot), None)
            edges = [("ACTIVE", "RETIRING"), ("RETIRING", "RECYCLING"), ("RECYCLING", "DORMANT")]
        else:
            edges = []
        done = taken(
            self.job_id,
            decision.decision_id,
            action=decision.action,
            layer_name=layer,
            slot=slot,
            reason="done",
        )
        self.carry.append(done)
        for offset, (a, b) in enumerate(edges):
            self.events.append(transition(self.job_id, layer, slot, a, b, step + offset))
        self.events.append(done)


async def run_job(h: Harness, late: bool, config: PolicyConfig) -> list[ControlAnswer]:
    controller = h.controller(config, start=False)
    job = ScriptedJob("job-fit")
    for epoch in range(EPOCHS):
        point = job.report(epoch)
        events, job.events = job.events, []
        for message in [point, *events] if late else [*events, point]:
            await handle(controller, message)
        answer = (await h.answers(job.job_id))[-1]
        assert answer.point == point.point
        for decision in answer.decisions:
            job.execute(decision, point.step)
    await controller.store.redis.aclose()
    return await h.answers(job.job_id)


async def test_each_fitting_rule_decides_the_same_whenever_the_events_arrive(
    harness: Harness,
) -> None:
    late = Harness(harness.bus.model_copy(update={"prefix": f"{harness.bus.prefix}-late"}))
    try:
        early_answers = await run_job(harness, late=False, config=CONFIG)
        late_answers = await run_job(late, late=True, config=CONFIG)
        early_state = await harness.state("job-fit")
        late_state = await late.state("job-fit")
    finally:
        await late.close()
    assert early_answers == late_answers
    decided = [
        (a.epoch, d.action, d.evidence.get("growth_trigger"))
        for a in early_answers
        for d in a.decisions
    ]
    assert decided == [
        (5, "germinate", "train_stall"),  # the slow learner, before any plateau
        (7, "keep", None),  # it pays 0.2
        (10, "retire", None),  # judged again: three epochs at 0 after its keep
        (21, "germinate", "plateau"),  # not while it overfits (14–17): once it is back down
        (23, "retire", None),  # does not pay: with max_unpaid_germinations 1, growth stops
    ]
    notes = {a.epoch: a.note for a in early_answers}
    assert "contributed below rejudge_threshold 0.005 for 3 epoch reports" in notes[10]
    assert all(notes[e].startswith("nothing to do: overfitting: val loss") for e in range(14, 18))
    assert all(notes[e].startswith("nothing to do: growth stopped") for e in (24, 25))
    assert early_state is not None and late_state is not None
    ignored = {"version", "updated_at", "created_at"}
    assert early_state.model_dump(exclude=ignored) == late_state.model_dump(exclude=ignored)

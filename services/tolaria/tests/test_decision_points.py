"""Decision points (issue #15): a job asks at the end of each epoch (and every
`decide_every_steps` steps), waits for the controller's answer to that report, bounded, and
applies it there. A real JobRuntime and JobTrainer on a real Redis; the test plays Tamiyo: it
beats on the health topic and answers the job's decision-point reports on the control topic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import pytest
import redis
from jobhelpers import started

import esper
from esper.bus import FIELD
from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionPointMissed,
    DecisionTaken,
    Envelope,
    Heartbeat,
    JobSpec,
    Message,
    SeedTransition,
    TelemetryReport,
)
from esper.kernels import KernelCache
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings
from tolaria.training import JobTrainer

JOB = "points-test"
STEPS = 14
"""Steps an epoch: circles' 600 samples leave 420 to train on, in batches of 32."""

Decide = Callable[[TelemetryReport], list[ControlDecision] | None]


def spec_with(epochs: int, **morphogenesis: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
            "dataset": {"kind": "circles", "samples": 600},
            "training": {"batch_size": 32, "lr": 0.01, "epochs": epochs},
            "morphogenesis": morphogenesis,
        }
    )


@pytest.fixture
def runtime(settings: TolariaSettings) -> Iterator[JobRuntime]:
    with started(settings, JOB) as job_runtime:
        yield job_runtime


def trainer_for(runtime: JobRuntime, spec: JobSpec, *, create: bool = True) -> JobTrainer:
    settings = runtime.settings
    trainer = JobTrainer(runtime, spec, settings.data_dir, settings.work_dir)
    if create:
        runtime.call(runtime.store.create(JOB, spec))
    assert len(trainer.data.train_y) == 420, "STEPS assumes 420 training samples"
    return trainer


def loadable_kernel(trainer: JobTrainer) -> str:
    """A kernel this job loads without Urza: compiled here, served by the job's kernel cache."""
    assert trainer.morphable is not None
    registry = esper.LocalKernelRegistry()
    meta = registry.compile("residual_mlp", trainer.morphable.layer("2").base_layer)
    trainer.morphable.kernels = KernelCache([registry])
    return meta.kernel_id


def germinate(decision_id: str, kernel: str) -> ControlDecision:
    return ControlDecision(
        decision_id=decision_id,
        job_id=JOB,
        action="germinate",
        layer="2",
        seed=0,
        kernel=kernel,
        reason="test",
    )


def job_events(runtime: JobRuntime) -> list[Message]:
    """What the job wrote to its own event stream, once everything it queued is there."""
    runtime.flush()

    async def read() -> list[Message]:
        entries = await runtime.redis.xrange(runtime.store.events_key(JOB))
        return [decoded(fields) for _, fields in entries or []]

    return runtime.call(read())


def decoded(fields: Any) -> Message:
    return Envelope.decode((fields or {})[FIELD]).message()


def epoch_report(runtime: JobRuntime, epoch: int) -> TelemetryReport:
    [report] = [
        e
        for e in job_events(runtime)
        if isinstance(e, TelemetryReport) and e.kind == "epoch" and e.epoch == epoch
    ]
    return report


class Controller:
    """Plays Tamiyo for the job: beats on the health topic, reads the job's reports from the
    telemetry stream on a thread, and answers each decision point with `decide(report)`'s
    decisions (None: no answer)."""

    def __init__(self, runtime: JobRuntime, decide: Decide, *, beat: bool = True) -> None:
        self.runtime = runtime
        self.decide = decide
        self.beat = beat
        self.reports: list[TelemetryReport] = []
        self.errors: list[BaseException] = []
        self._client = redis.Redis.from_url(runtime.bus.redis_url)
        self._stream = runtime.bus.stream("telemetry")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="test-controller", daemon=True)

    def __enter__(self) -> Controller:
        if self.beat:
            heartbeat = Heartbeat(
                service="tamiyo",
                instance="tamiyo-test",
                status="ok",
                started_at=time.time(),
                interval_s=60.0,
            )
            self.publish(heartbeat)
        # Reports from now on only: an earlier process's are not this job's questions.
        last: Any = self._client.xrevrange(self._stream, count=1)
        self._last: Any = last[0][0] if last else "0-0"
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()
        if kind is None:
            assert not self.errors, f"the test controller failed: {self.errors!r}"

    def publish(self, message: Message) -> None:
        envelope = Envelope.wrap(message, source="tamiyo")
        self.runtime.call(self.runtime.producer.publish(envelope))

    def answer(self, report: TelemetryReport, decisions: list[ControlDecision]) -> None:
        answer = ControlAnswer(
            job_id=JOB,
            epoch=report.epoch,
            step=report.step,
            kind=report.kind,
            decisions=decisions,
            note="test answer",
        )
        assert answer.point == report.point
        self.publish(answer)

    def asked(self) -> list[TelemetryReport]:
        return [r for r in self.reports if r.decision_point]

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                found: Any = self._client.xread({self._stream: self._last}, block=20)
                for _, entries in found or []:
                    for entry_id, fields in entries:
                        self._last = entry_id
                        self._seen(decoded(fields))
        except BaseException as err:  # reported by __exit__, on the test's thread
            self.errors.append(err)

    def _seen(self, report: Message) -> None:
        if not isinstance(report, TelemetryReport) or report.job_id != JOB:
            return
        self.reports.append(report)
        if report.decision_point:
            decisions = self.decide(report)
            if decisions is not None:
                self.answer(report, decisions)


def answer_nothing(report: TelemetryReport) -> list[ControlDecision]:
    return []


def test_the_job_waits_for_the_answer_and_applies_it_at_the_point(runtime: JobRuntime) -> None:
    trainer = trainer_for(runtime, spec_with(epochs=2))
    decision = germinate("d-at-point", loadable_kernel(trainer))
    assert trainer.orchestrator is not None and trainer.points is not None

    def decide(report: TelemetryReport) -> list[ControlDecision]:
        return [decision] if report.point == f"epoch:0:{STEPS}" else []

    with Controller(runtime, decide) as tamiyo:
        loss, samples_per_s = trainer.train_epoch(0)
        trainer.end_epoch(0, loss, samples_per_s)
        # Applied before end_epoch returned: the job waited for the answer.
        record = trainer.orchestrator.records()[("2", 0)]
        assert (record.decision_id, record.germinated_step, record.germinated_epoch) == (
            "d-at-point",
            STEPS,
            0,
        )
        [taken] = trainer.points.unreported
        assert (taken.decision_id, taken.outcome) == ("d-at-point", "applied")
        loss, samples_per_s = trainer.train_epoch(1)
        trainer.end_epoch(1, loss, samples_per_s)
    assert [r.point for r in tamiyo.asked()] == [f"epoch:0:{STEPS}"]  # the last epoch asks nothing
    events = job_events(runtime)
    allocated = [e for e in events if isinstance(e, SeedTransition) and e.to_state == "ALLOCATED"]
    assert [(e.layer, e.seed, e.step) for e in allocated] == [("2", 0, STEPS)]
    assert not [e for e in events if isinstance(e, DecisionPointMissed)]
    assert epoch_report(runtime, 0).answers == []
    assert epoch_report(runtime, 1).answers == [taken]
    assert not trainer.points.unreported


def test_without_a_controller_the_point_is_passed_at_once(runtime: JobRuntime) -> None:
    trainer = trainer_for(runtime, spec_with(epochs=3, decision_timeout_s=30.0))
    loss, samples_per_s = trainer.train_epoch(0)
    began = time.monotonic()
    trainer.end_epoch(0, loss, samples_per_s)
    assert time.monotonic() - began < 5
    missed = [e for e in job_events(runtime) if isinstance(e, DecisionPointMissed)]
    assert [(m.reason, m.epoch, m.step, m.kind, m.waited_s) for m in missed] == [
        ("no_controller", 0, STEPS, "epoch", 0.0)
    ]
    assert trainer.points is not None and trainer.points.missed == 1
    assert trainer.points.open is None
    assert trainer.progress.epoch == 1


def test_an_unanswered_point_times_out_and_a_late_answer_is_never_applied(
    runtime: JobRuntime,
) -> None:
    trainer = trainer_for(runtime, spec_with(epochs=3, decision_timeout_s=0.5))
    late = germinate("d-late", loadable_kernel(trainer))
    assert trainer.orchestrator is not None and trainer.points is not None and trainer.morphable
    with Controller(runtime, lambda report: None) as tamiyo:
        loss, samples_per_s = trainer.train_epoch(0)
        began = time.monotonic()
        trainer.end_epoch(0, loss, samples_per_s)
        waited = time.monotonic() - began
        assert 0.5 <= waited < 5
        [missed] = [e for e in job_events(runtime) if isinstance(e, DecisionPointMissed)]
        assert (missed.reason, missed.epoch, missed.step, missed.kind) == (
            "timeout",
            0,
            STEPS,
            "epoch",
        )
        assert 0.5 <= missed.waited_s < 5

        # The answer to the passed point comes now; the job has it before its next point.
        [asked] = tamiyo.asked()
        handled = runtime.consumer.stats.handled
        tamiyo.answer(asked, [late])
        deadline = time.monotonic() + 5
        while runtime.consumer.stats.handled == handled:
            assert time.monotonic() < deadline, "the job never received the late answer"
            time.sleep(0.01)

        tamiyo.decide = answer_nothing
        loss, samples_per_s = trainer.train_epoch(1)
        trainer.end_epoch(1, loss, samples_per_s)
    assert [r.point for r in tamiyo.asked()] == [f"epoch:0:{STEPS}", f"epoch:1:{2 * STEPS}"]
    assert trainer.orchestrator.outcome("d-late") is None
    assert trainer.morphable.all_dormant
    assert not trainer.points.unreported
    assert not [e for e in job_events(runtime) if isinstance(e, DecisionTaken)]
    assert trainer.points.missed == 1
    assert trainer.progress.epoch == 2


def test_step_points_come_every_k_steps_and_their_answer_is_applied_there(
    runtime: JobRuntime,
) -> None:
    every = 2
    trainer = trainer_for(runtime, spec_with(epochs=2, decide_every_steps=every))
    decision = germinate("d-step", loadable_kernel(trainer))
    assert trainer.orchestrator is not None and trainer.morphable is not None
    assert STEPS % every == 0  # the epoch's last step is a multiple: the epoch's own point

    def decide(report: TelemetryReport) -> list[ControlDecision]:
        return [decision] if report.point == f"step:0:{every}" else []

    with Controller(runtime, decide) as tamiyo:
        loss, samples_per_s = trainer.train_epoch(0)
        record = trainer.orchestrator.records()[("2", 0)]
        assert (record.decision_id, record.germinated_step) == ("d-step", every)
        trainer.end_epoch(0, loss, samples_per_s)
    asked = tamiyo.asked()
    step_points = list(range(every, STEPS, every))
    assert [(r.kind, r.epoch, r.step) for r in asked] == [
        *(("step", 0, step) for step in step_points),
        ("epoch", 0, STEPS),
    ]
    # The seed trained from the step after its point: α ramps one step in each of the rest.
    ramp = trainer.morph.ramp_steps
    alpha = trainer.morphable.layer("2").seed_info(0).alpha
    assert alpha == pytest.approx((STEPS - every) / ramp)
    # The answer travels with the next report, the point two steps on.
    answers = {r.step: [(a.decision_id, a.outcome) for a in r.answers] for r in asked}
    assert answers.pop(2 * every) == [("d-step", "applied")]
    assert not any(answers.values())
    assert trainer.progress.step == STEPS


def test_a_resumed_job_asks_its_open_point_again_and_applies_the_answer(
    settings: TolariaSettings,
) -> None:
    spec = spec_with(epochs=2)
    with started(settings, JOB) as first:
        trainer = trainer_for(first, spec)

        def go_down(report: TelemetryReport) -> None:
            first.stop_event.set()  # the process goes down while it waits for the answer

        with Controller(first, go_down) as tamiyo:
            loss, samples_per_s = trainer.train_epoch(0)
            trainer.end_epoch(0, loss, samples_per_s)
        [open_point] = tamiyo.asked()
    assert open_point.point == f"epoch:0:{STEPS}"

    with started(settings, JOB) as second:
        resumed = trainer_for(second, spec, create=False)
        decision = germinate("d-resumed", loadable_kernel(resumed))
        assert resumed.orchestrator is not None and resumed.points is not None

        def decide(report: TelemetryReport) -> list[ControlDecision]:
            return [decision] if report.point == open_point.point else []

        with Controller(second, decide) as tamiyo:
            assert resumed.resume()
            assert resumed.points.open is not None
            assert resumed.points.open.point == open_point.point
            assert resumed.progress.epoch == 1
            resumed.run()
        assert [r.point for r in tamiyo.asked()] == [open_point.point]
        record = resumed.orchestrator.records()[("2", 0)]
        assert (record.decision_id, record.germinated_step, record.germinated_epoch) == (
            "d-resumed",
            STEPS,
            0,
        )
        [taken] = epoch_report(second, 1).answers
        assert (taken.decision_id, taken.outcome) == ("d-resumed", "applied")
        assert resumed.progress.epoch == 2
        assert resumed.points.open is None


def test_a_transition_made_by_a_step_carries_that_step(runtime: JobRuntime) -> None:
    trainer = trainer_for(runtime, spec_with(epochs=3))
    grow = germinate("d-grow", loadable_kernel(trainer))
    retire = ControlDecision(
        decision_id="d-retire",
        job_id=JOB,
        action="retire",
        layer="2",
        seed=0,
        ramp_steps=3,
        reason="test",
    )

    def decide(report: TelemetryReport) -> list[ControlDecision]:
        return [grow] if report.epoch == 0 else [retire]

    with Controller(runtime, decide):
        for epoch in range(2):
            loss, samples_per_s = trainer.train_epoch(epoch)
            trainer.end_epoch(epoch, loss, samples_per_s)
        trainer.train_epoch(2)
    steps = {
        (e.from_state, e.to_state): e.step
        for e in job_events(runtime)
        if isinstance(e, SeedTransition)
    }
    assert steps[("ACTIVE", "RETIRING")] == 2 * STEPS  # at the point
    # The ramp runs in steps 28, 29 and 30; it ends in the third.
    assert steps[("RETIRING", "RECYCLING")] == 2 * STEPS + 2
    assert steps[("RECYCLING", "DORMANT")] == 2 * STEPS + 2


def test_a_passed_point_is_not_asked_again_after_a_restart(settings: TolariaSettings) -> None:
    spec = spec_with(epochs=2)
    with started(settings, JOB) as first:
        trainer = trainer_for(first, spec)
        loss, samples_per_s = trainer.train_epoch(0)
        trainer.end_epoch(0, loss, samples_per_s)  # no controller: passed
        assert trainer.points is not None and trainer.points.missed == 1
    with started(settings, JOB) as second:
        resumed = trainer_for(second, spec, create=False)
        assert resumed.resume() and resumed.points is not None
        assert resumed.points.open is None
        assert resumed.points.missed == 1


def test_an_operators_decision_outlives_the_job_process_that_held_it(
    settings: TolariaSettings,
) -> None:
    """Held in the inbox (its bus message acked) by a process that dies before its next point:
    the resumed job executes it, once, and it leaves the inbox with the checkpoint after."""
    spec = spec_with(epochs=3)
    with started(settings, JOB) as first:
        trainer = trainer_for(first, spec)
        kernel = loadable_kernel(trainer)
        loss, samples_per_s = trainer.train_epoch(0)
        trainer.end_epoch(0, loss, samples_per_s)  # the checkpoint of epoch 0, no point open
        operator = germinate("d-operator", kernel)
        first.call(first.producer.publish(Envelope.wrap(operator, source="test")))
        deadline = time.monotonic() + 10
        while first.call(first.store.held_decisions(JOB)) != [operator]:
            assert time.monotonic() < deadline, "the decision never reached the inbox"
            time.sleep(0.02)
        trainer.train_epoch(1)  # then the process dies: epoch 1 never reaches its point
    assert trainer.points is not None and trainer.points.unreported == []

    with started(settings, JOB) as second:
        resumed = trainer_for(second, spec, create=False)
        loadable_kernel(resumed)
        assert resumed.resume() and resumed.progress.epoch == 1
        assert [d.decision_id for d in held_queue(second)] == ["d-operator"]
        loss, samples_per_s = resumed.train_epoch(1)
        resumed.end_epoch(1, loss, samples_per_s)  # no controller: the point passes
        assert resumed.orchestrator is not None
        record = resumed.orchestrator.records()[("2", 0)]
        assert (record.decision_id, record.germinated_step) == ("d-operator", 2 * STEPS)
        assert second.call(second.store.held_decisions(JOB)) == []
        [taken] = [e for e in job_events(second) if isinstance(e, DecisionTaken)]
        assert (taken.decision_id, taken.outcome) == ("d-operator", "applied")


def held_queue(runtime: JobRuntime) -> list[ControlDecision]:
    """The decisions queued for the next point (taken out and put back, in order)."""
    queued = []
    while not runtime.decisions.empty():
        queued.append(runtime.decisions.get())
    for decision in queued:
        runtime.decisions.put(decision)
    return queued


def test_the_controller_is_found_behind_many_other_heartbeats(runtime: JobRuntime) -> None:
    """Every job beats on the health topic too: a busy stack's newest few hundred beats may
    all be jobs'. The controller's beat is looked for by time, not among the last N."""

    def beat(service: str, instance: str) -> None:
        heartbeat = Heartbeat(
            service=service, instance=instance, status="ok", started_at=time.time(), interval_s=5
        )
        runtime.call(runtime.producer.publish(Envelope.wrap(heartbeat, source="test")))

    assert not runtime.controller_alive()
    beat("tamiyo", "tamiyo-test")
    for i in range(450):
        beat("tolaria-job", f"job-{i}")
    assert runtime.controller_alive()

"""SeedOrchestrator: real decisions on a real wrapped model, with kernels compiled through a
LocalKernelRegistry and real optimizer steps between them."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.blueprints.compiler import compile_kernel_id
from esper.contracts import Envelope
from esper.contracts.control import ControlDecision
from esper.contracts.envelope import Message
from esper.contracts.events import DecisionTaken, RefusalCode, SeedTransition
from esper.contracts.jobs import MorphogenesisSpec
from esper.exceptions import ConfigError
from esper.kasmina import SeedState
from esper.training import LocalKernelProvider, SeedOrchestrator

JOB = "job-1"
S = SeedState
_ids = itertools.count()


@pytest.fixture(scope="module")
def kernel_registry() -> esper.LocalKernelRegistry:
    """Shared by the module: a kernel depends on a layer's signature, never on its weights, so
    each blueprint is compiled once however many tests germinate it."""
    return esper.LocalKernelRegistry()


@pytest.fixture(scope="module")
def provider(kernel_registry: esper.LocalKernelRegistry) -> LocalKernelProvider:
    return LocalKernelProvider(kernel_registry)


def decision(action: str = "germinate", **fields: Any) -> ControlDecision:
    fields.setdefault("decision_id", f"d-{next(_ids)}")
    fields.setdefault("job_id", JOB)
    fields.setdefault("layer", "layer1")
    fields.setdefault("reason", "test")
    if action == "germinate" and "kernel" not in fields:
        fields.setdefault("blueprint", "low_rank")
    return ControlDecision(action=action, **fields)  # type: ignore[arg-type]


@dataclass
class Job:
    """A wrapped model in training, its orchestrator and what the orchestrator emitted."""

    morphable: esper.MorphableModel
    orchestrator: SeedOrchestrator
    optimizer: torch.optim.Optimizer
    emitted: list[Message] = field(default_factory=list)
    step: int = 0

    def train(self, steps: int = 1) -> float:
        g = torch.Generator().manual_seed(self.step)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            self.orchestrator.on_step(self.step)  # the runner's convention: the step now running
            x, y = torch.randn(16, 16, generator=g), torch.randn(16, 4, generator=g)
            loss = nn.functional.mse_loss(self.morphable(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.morphable.step()
            self.step += 1
        return loss.item()

    async def execute(self, d: ControlDecision, epoch: int = 0) -> DecisionTaken:
        return await self.orchestrator.execute(d, step=self.step, epoch=epoch)

    def transitions(self) -> list[tuple[str, str]]:
        return [(m.from_state, m.to_state) for m in self.emitted if isinstance(m, SeedTransition)]

    def states(self) -> list[tuple[str, int, SeedState, str | None]]:
        return [(s.layer, s.seed, s.state, s.kernel_id) for s in self.morphable.seeds()]

    def alpha(self, layer: str = "layer1", seed: int = 0) -> float:
        return self.morphable.seeds(layer)[seed].alpha


JobFactory = Callable[..., Job]


@pytest.fixture
def make_job(
    mlp: nn.Module, kernel_registry: esper.LocalKernelRegistry, provider: LocalKernelProvider
) -> JobFactory:
    def make(model: nn.Module | None = None, **spec: Any) -> Job:
        morphable = esper.wrap(
            model if model is not None else mlp,
            seeds_per_layer=2,
            kernels=esper.KernelCache([kernel_registry]),
        )
        optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)
        morphable.attach_optimizer(optimizer)
        settings = MorphogenesisSpec(**{"ramp_steps": 4, "max_seeds": 3, **spec})
        emitted: list[Message] = []
        orchestrator = SeedOrchestrator(morphable, JOB, provider, settings, emitted.append)
        orchestrator.attach()
        return Job(morphable, orchestrator, optimizer, emitted)

    return make


@pytest.fixture
def job(make_job: JobFactory) -> Job:
    return make_job()


# ------------------------------------------------------------------------------ germinate
async def test_germinate_by_blueprint_loads_ramps_and_reports(job: Job) -> None:
    job.train(2)
    answer = await job.execute(decision(decision_id="g1", alpha=0.5, ramp_steps=4), epoch=1)

    assert answer.outcome == "applied", answer.reason
    assert (answer.decision_id, answer.job_id, answer.layer, answer.seed) == (
        "g1",
        JOB,
        "layer1",
        0,
    )
    assert answer.action == "germinate" and "low_rank" in answer.reason
    info = job.morphable.seeds("layer1")[0]
    signature = job.morphable.layer("layer1").signature
    expected_id = compile_kernel_id(esper.get_blueprint("low_rank"), signature, "export")
    assert (info.state, info.kernel_id, info.alpha) == (S.ACTIVE, expected_id, 0.0)

    assert job.transitions() == [
        ("DORMANT", "ALLOCATED"),
        ("ALLOCATED", "LOADING"),
        ("LOADING", "ACTIVE"),
    ]
    events = [m for m in job.emitted if isinstance(m, SeedTransition)]
    assert all(e.job_id == JOB and e.step == 2 and e.layer == "layer1" for e in events)
    assert events[-1].kernel_id == expected_id
    assert job.emitted[-1] == answer  # the answer follows the transitions it caused

    alphas = []
    for _ in range(5):
        job.train(1)
        alphas.append(job.alpha())
    assert alphas == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    assert "seed:layer1:0" in [g.get("name") for g in job.optimizer.param_groups]

    [view] = job.orchestrator.seed_views()
    assert (view.layer, view.seed, view.state, view.blueprint) == (
        "layer1",
        0,
        "ACTIVE",
        "low_rank",
    )
    assert (view.kernel_id, view.germinated_epoch, view.contribution) == (expected_id, 1, None)
    assert view.alpha == pytest.approx(0.5)
    record = job.orchestrator.records()[("layer1", 0)]
    assert (record.decision_id, record.germinated_step) == ("g1", 2)


async def test_germinate_without_a_slot_picks_a_free_one(job: Job) -> None:
    first = await job.execute(decision(seed=1))
    second = await job.execute(decision(seed=None))
    third = await job.execute(decision(seed=None))

    assert (first.outcome, first.seed) == ("applied", 1)
    assert (second.outcome, second.seed) == ("applied", 0)
    assert third.outcome == "refused" and third.code == "no_free_slot"
    assert "no free seed slot in layer 'layer1'" in third.reason
    assert [s.state for s in job.morphable.seeds("layer1")] == [S.ACTIVE, S.ACTIVE]


async def test_germinate_a_published_kernel_by_tag_uses_the_spec_defaults(
    make_job: JobFactory, kernel_registry: esper.LocalKernelRegistry, mlp: nn.Module
) -> None:
    meta = kernel_registry.compile("low_rank", mlp.layer2)
    kernel_registry.tag("efficiency_kernel_v1", meta.kernel_id)
    job = make_job(ramp_steps=0, blend="lerp")

    answer = await job.execute(decision(layer="layer2", kernel="efficiency_kernel_v1", alpha=0.7))

    assert answer.outcome == "applied", answer.reason
    info = job.morphable.seeds("layer2")[0]
    assert (info.kernel_id, info.blend.value, info.alpha) == (meta.kernel_id, "lerp", 0.7)
    [view] = job.orchestrator.seed_views()
    assert view.blueprint is None and view.kernel_id == meta.kernel_id


async def test_concurrent_germinations_take_different_slots(job: Job) -> None:
    answers = await asyncio.gather(job.execute(decision()), job.execute(decision()))
    assert sorted((a.outcome, a.seed) for a in answers) == [("applied", 0), ("applied", 1)]


# ----------------------------------------------------------------------------- idempotent
async def test_a_repeated_decision_id_returns_the_earlier_outcome_without_acting(job: Job) -> None:
    first = await job.execute(decision(decision_id="same"))
    emitted = len(job.emitted)
    again = await job.execute(decision(decision_id="same"))
    # Even a different decision under the same id is not acted on: the id is the identity.
    other = await job.execute(decision(decision_id="same", layer="layer2", seed=1))

    assert again == first and other == first
    assert len(job.emitted) == emitted  # nothing re-done, nothing re-announced
    assert [s.state for s in job.morphable.seeds()].count(S.ACTIVE) == 1
    assert job.orchestrator.outcome("same") == first


async def test_the_same_id_in_flight_twice_acts_once(job: Job) -> None:
    a, b = await asyncio.gather(
        job.execute(decision(decision_id="twin")), job.execute(decision(decision_id="twin"))
    )
    assert a == b and a.outcome == "applied"
    assert [s.state for s in job.morphable.seeds()].count(S.ACTIVE) == 1


async def test_remembered_decision_ids_are_bounded(
    mlp: nn.Module, kernel_registry: esper.LocalKernelRegistry, provider: LocalKernelProvider
) -> None:
    morphable = esper.wrap(mlp, kernels=esper.KernelCache([kernel_registry]))
    orchestrator = SeedOrchestrator(
        morphable, JOB, provider, MorphogenesisSpec(), lambda m: None, max_remembered=2
    )
    for i in range(3):
        await orchestrator.execute(decision(decision_id=f"r{i}", layer="nope"), step=0, epoch=0)
    assert orchestrator.outcome("r0") is None
    assert orchestrator.outcome("r1") is not None and orchestrator.outcome("r2") is not None


# -------------------------------------------------------------------------------- refused
REFUSALS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown layer", {"layer": "layer9"}, ["unknown layer 'layer9'", "layer1, layer2"]),
    ("unknown blueprint", {"blueprint": "no_such_thing"}, ["unknown blueprint 'no_such_thing'"]),
    ("host mismatch", {"blueprint": "conv3x3"}, ["conv3x3", "conv2d", "linear"]),
    ("slot occupied", {"seed": 0}, ["seed 0 of layer 'layer1' is ACTIVE", "not DORMANT"]),
    ("seed out of range", {"seed": 5}, ["seed 5 is out of range", "2 seed slots"]),
    ("other job", {"job_id": "job-2"}, ["job-2", JOB]),
    ("unknown kernel", {"kernel": "no_such_tag"}, ["no_such_tag", "failed"]),
    ("retire a dormant seed", {"action": "retire", "seed": 1}, ["DORMANT, not ACTIVE"]),
    ("keep a dormant seed", {"action": "keep", "seed": 1}, ["cannot keep", "DORMANT"]),
    ("alpha of a dormant seed", {"action": "set_alpha", "seed": 1, "alpha": 0.5}, ["DORMANT"]),
]
CODES: dict[str, RefusalCode] = {
    "unknown layer": "unknown_layer",
    "unknown blueprint": "kernel_unavailable",
    "host mismatch": "kernel_unavailable",
    "slot occupied": "seed_state",
    "seed out of range": "invalid_seed",
    "other job": "wrong_job",
    "unknown kernel": "load_failed",
    "retire a dormant seed": "seed_state",
    "keep a dormant seed": "seed_state",
    "alpha of a dormant seed": "seed_state",
}


@pytest.mark.parametrize(("case", "fields", "words"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_a_bad_decision_is_refused_and_training_goes_on(
    job: Job, case: str, fields: dict[str, Any], words: list[str]
) -> None:
    assert (await job.execute(decision(seed=0))).outcome == "applied"
    job.train(1)
    states = job.states()
    weights = {k: v.clone() for k, v in job.morphable.state_dict().items() if torch.is_tensor(v)}
    emitted = len(job.emitted)

    action = fields.pop("action", "germinate")
    answer = await job.execute(decision(action, **fields))

    assert answer.outcome == "refused"
    assert answer.code == CODES[case], answer.reason
    for word in words:
        assert word in answer.reason, answer.reason
    assert job.emitted[-1] == answer
    assert job.states() == states
    after = {k: v for k, v in job.morphable.state_dict().items() if torch.is_tensor(v)}
    torch.testing.assert_close(after, weights, rtol=0, atol=0, equal_nan=True)  # untouched
    new_transitions = [m for m in job.emitted[emitted:] if isinstance(m, SeedTransition)]
    if case == "unknown kernel":  # the slot was allocated, then the load failed back to DORMANT
        assert [(m.from_state, m.to_state) for m in new_transitions] == [
            ("DORMANT", "ALLOCATED"),
            ("ALLOCATED", "DORMANT"),
        ]
    else:
        assert new_transitions == []
    assert math.isfinite(job.train(2))


async def test_germination_past_max_seeds_is_refused(make_job: JobFactory) -> None:
    job = make_job(max_seeds=2)
    assert (await job.execute(decision())).outcome == "applied"
    assert (await job.execute(decision(layer="layer2"))).outcome == "applied"

    answer = await job.execute(decision(layer="layer2"))

    assert answer.outcome == "refused" and answer.code == "max_seeds"
    assert "max_seeds reached" in answer.reason and "holds 2 seed(s)" in answer.reason
    assert job.morphable.seeds("layer2")[1].state is S.DORMANT
    assert math.isfinite(job.train(1))


async def test_germination_is_refused_when_morphogenesis_is_disabled(make_job: JobFactory) -> None:
    job = make_job(enabled=False)
    answer = await job.execute(decision())
    assert answer.outcome == "refused" and "disabled" in answer.reason
    assert answer.code == "morphogenesis_off"
    assert all(s.state is S.DORMANT for s in job.morphable.seeds())


async def test_a_failing_emit_does_not_break_execution(
    mlp: nn.Module, kernel_registry: esper.LocalKernelRegistry, provider: LocalKernelProvider
) -> None:
    def broken(message: Message) -> None:
        raise RuntimeError("bus down")

    morphable = esper.wrap(mlp, kernels=esper.KernelCache([kernel_registry]))
    orchestrator = SeedOrchestrator(morphable, JOB, provider, MorphogenesisSpec(), broken)
    orchestrator.attach()
    answer = await orchestrator.execute(decision(), step=0, epoch=0)
    assert answer.outcome == "applied"
    assert morphable.seeds("layer1")[0].state is S.ACTIVE


# ------------------------------------------------------------------ retire, keep, set_alpha
async def test_retire_ramps_alpha_down_then_recycles_the_slot(job: Job) -> None:
    await job.execute(decision(ramp_steps=2))
    job.train(2)
    assert job.alpha() == 1.0
    before = len(job.emitted)

    answer = await job.execute(decision("retire", seed=0, ramp_steps=3))

    assert (answer.outcome, answer.seed) == ("applied", 0)
    assert job.morphable.seeds("layer1")[0].state is S.RETIRING
    alphas = []
    for _ in range(3):
        job.train(1)
        alphas.append(job.alpha())
    assert alphas == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert job.morphable.seeds("layer1")[0].state is S.DORMANT
    transitions = [m for m in job.emitted[before:] if isinstance(m, SeedTransition)]
    assert [(m.from_state, m.to_state) for m in transitions] == [
        ("ACTIVE", "RETIRING"),
        ("RETIRING", "RECYCLING"),
        ("RECYCLING", "DORMANT"),
    ]
    assert transitions[0].step == 2 and transitions[-1].step == 4  # from on_step()
    assert answer.decision_id in transitions[0].reason
    assert job.orchestrator.seed_views() == [] and job.orchestrator.records() == {}
    assert "seed:layer1:0" not in [g.get("name") for g in job.optimizer.param_groups]
    # the slot is free again for the next germination
    assert (await job.execute(decision(seed=0))).outcome == "applied"


async def test_retire_at_once(job: Job) -> None:
    await job.execute(decision())
    answer = await job.execute(decision("retire", seed=0))
    assert answer.outcome == "applied"
    assert job.transitions()[-2:] == [("RETIRING", "RECYCLING"), ("RECYCLING", "DORMANT")]
    # retiring again: the seed is no longer ACTIVE
    again = await job.execute(decision("retire", seed=0))
    assert again.outcome == "refused" and "DORMANT, not ACTIVE" in again.reason
    assert again.code == "seed_state"


async def test_keep_is_recorded_and_kept_only_for_active_seeds(job: Job) -> None:
    await job.execute(decision())
    job.train(3)
    answer = await job.execute(decision("keep", seed=0), epoch=2)

    assert answer.outcome == "applied"
    record = job.orchestrator.records()[("layer1", 0)]
    assert (record.kept_step, record.kept_epoch) == (3, 2)
    assert job.morphable.seeds("layer1")[0].state is S.ACTIVE

    await job.execute(decision("retire", seed=0, ramp_steps=5))
    refused = await job.execute(decision("keep", seed=0))
    assert refused.outcome == "refused" and "is RETIRING" in refused.reason
    assert refused.code == "seed_state"


async def test_set_alpha_at_once_and_by_ramp(job: Job) -> None:
    await job.execute(decision(alpha=0.2, ramp_steps=1))
    job.train(1)

    now = await job.execute(decision("set_alpha", seed=0, alpha=0.3))
    assert now.outcome == "applied" and job.alpha() == pytest.approx(0.3)

    ramped = await job.execute(decision("set_alpha", seed=0, alpha=0.8, ramp_steps=2))
    assert ramped.outcome == "applied"
    job.train(1)
    assert job.alpha() == pytest.approx(0.55)
    job.train(1)
    assert job.alpha() == pytest.approx(0.8)


async def test_set_alpha_past_the_lerp_budget_is_refused(make_job: JobFactory) -> None:
    job = make_job(blend="lerp", ramp_steps=0)
    await job.execute(decision(seed=0, alpha=0.6))
    await job.execute(decision(seed=1, alpha=0.3))

    answer = await job.execute(decision("set_alpha", seed=1, alpha=0.5))

    assert answer.outcome == "refused" and "LerpBudgetError" in answer.reason
    assert answer.code == "alpha_rejected"
    assert job.alpha(seed=1) == pytest.approx(0.3)


async def test_a_germination_that_cannot_reach_its_alpha_is_undone(make_job: JobFactory) -> None:
    job = make_job(blend="lerp", ramp_steps=0)
    await job.execute(decision(seed=0, alpha=0.8))

    answer = await job.execute(decision(seed=1, alpha=0.5))

    assert answer.outcome == "refused" and "cannot ramp seed 1" in answer.reason
    assert answer.code == "alpha_rejected"
    assert job.morphable.seeds("layer1")[1].state is S.DORMANT
    assert job.orchestrator.seed_views()[0].seed == 0


# ------------------------------------------------------------------------------- measure
class Thin(nn.Module):
    """A linear model on a nonlinear task: too small a host, which a seed can help."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def nonlinear_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (torch.sin(2 * x[:, :1]) * x[:, 1:2] + x[:, 2:3] ** 2)


async def test_measure_credits_a_helpful_seed_and_not_a_fresh_one(make_job: JobFactory) -> None:
    job = make_job(model=Thin(), ramp_steps=5)
    x, y = nonlinear_task(256, seed=1)
    x_val, y_val = nonlinear_task(256, seed=2)

    helpful = await job.execute(decision(layer="fc", blueprint="residual_mlp"))
    assert helpful.outcome == "applied", helpful.reason
    for step in range(300):
        loss = nn.functional.mse_loss(job.morphable(x), y)
        job.optimizer.zero_grad()
        loss.backward()
        job.optimizer.step()
        job.morphable.step()
        job.orchestrator.on_step(step + 1)
    fresh = await job.execute(decision(layer="fc", blueprint="residual_mlp", ramp_steps=1))
    job.morphable.step()  # its α reaches 1: a zero-initialized last layer still adds nothing

    def evaluate() -> float:
        return -nn.functional.mse_loss(job.morphable(x_val), y_val).item()

    contributions = job.orchestrator.measure(evaluate)

    assert fresh.seed == 1 and job.alpha("fc", 1) == 1.0
    assert set(contributions) == {("fc", 0), ("fc", 1)}
    assert contributions[("fc", 0)] > 0.5, contributions
    assert contributions[("fc", 1)] == pytest.approx(0.0, abs=1e-6)
    layout = job.morphable.layer("fc").layout.contribution
    assert layout[0].item() == pytest.approx(contributions[("fc", 0)])
    views = {v.seed: v for v in job.orchestrator.seed_views()}
    assert views[0].contribution == pytest.approx(contributions[("fc", 0)])
    assert views[0].blueprint == "residual_mlp"
    assert job.morphable.seeds("fc")[0].alpha == 1.0  # restored after the counterfactual


async def test_measure_without_running_seeds_evaluates_nothing(job: Job) -> None:
    calls: list[int] = []

    def evaluate() -> float:
        calls.append(1)
        return 0.0

    assert job.orchestrator.measure(evaluate) == {}
    assert calls == []


async def test_contributions_are_read_from_the_model_which_keeps_the_one_copy(job: Job) -> None:
    await job.execute(decision(ramp_steps=1))
    job.morphable.step()
    metric = iter([0.3, 0.2])  # with the seed, then without it
    measured = job.orchestrator.measure(lambda: next(metric))
    value = measured[("layer1", 0)]
    assert value == 0.3 - 0.2  # exact: not the float32 of the layout buffer
    assert job.morphable.contribution("layer1", 0) == value
    assert [v.contribution for v in job.orchestrator.seed_views()] == [value]

    job.morphable.record_contribution("layer1", 0, 0.125)  # measured elsewhere, later
    assert job.orchestrator.contributions() == {("layer1", 0): 0.125}
    assert [v.contribution for v in job.orchestrator.seed_views()] == [0.125]
    assert job.orchestrator.state_dict()["contributions"] == [["layer1", 0, 0.125]]

    job.orchestrator.measure(lambda: math.nan)  # diverged: the earlier value must not stand
    assert math.isnan(job.morphable.contribution("layer1", 0))
    assert job.orchestrator.contributions() == {}
    assert [v.contribution for v in job.orchestrator.seed_views()] == [None]


# ----------------------------------------------------------------------------- checkpoint
async def test_state_dict_round_trip_makes_a_repeated_decision_a_no_op(
    job: Job, make_job: JobFactory, mlp: nn.Module
) -> None:
    germinate = decision(decision_id="g-resume")
    await job.execute(germinate, epoch=3)
    job.train(5)
    await job.execute(decision("keep", seed=0))
    job.orchestrator.measure(lambda: 1.0)  # a contribution of 0, recorded
    model_state = job.morphable.state_dict()
    orchestrator_state = json.loads(json.dumps(job.orchestrator.state_dict()))  # JSON-safe

    resumed = make_job(model=type(mlp)())
    resumed.morphable.load_state_dict(model_state)
    resumed.orchestrator.load_state_dict(orchestrator_state)
    # Restoring the model reloads its seed, and the attached orchestrator reports that truthfully.
    assert resumed.transitions() == [
        ("DORMANT", "ALLOCATED"),
        ("ALLOCATED", "LOADING"),
        ("LOADING", "ACTIVE"),
    ]
    restored = len(resumed.emitted)
    answer = await resumed.orchestrator.execute(germinate, step=6, epoch=4)

    assert answer == job.orchestrator.outcome("g-resume")
    assert len(resumed.emitted) == restored  # neither re-executed nor re-announced
    assert [s.state for s in resumed.morphable.seeds()].count(S.ACTIVE) == 1
    [view] = resumed.orchestrator.seed_views()
    assert (view.blueprint, view.germinated_epoch, view.contribution) == ("low_rank", 3, 0.0)
    record = resumed.orchestrator.records()[("layer1", 0)]
    assert (record.decision_id, record.kept_step) == ("g-resume", 5)
    assert resumed.orchestrator.step == job.orchestrator.step


async def test_a_checkpoint_from_before_refusal_codes_is_read_with_its_codes(job: Job) -> None:
    refused = await job.execute(decision(layer="layer9"))
    applied = await job.execute(decision())
    state = json.loads(json.dumps(job.orchestrator.state_dict()))
    for answer in state["decisions"]:  # as a v1 orchestrator wrote them: no code
        del answer["code"]

    job.orchestrator.load_state_dict(state)

    assert job.orchestrator.outcome(refused.decision_id) == refused
    assert job.orchestrator.outcome(applied.decision_id) == applied
    again = await job.execute(decision(layer="layer9", decision_id=refused.decision_id))
    assert again.code == "unknown_layer"


async def test_an_unexpected_error_is_refused_as_internal(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(job.orchestrator, "_layer", broken)
    answer = await job.execute(decision())
    assert (answer.outcome, answer.code) == ("refused", "internal")
    assert answer.reason.startswith("internal error: KeyError")


def test_load_state_dict_refuses_an_unreadable_state(job: Job) -> None:
    with pytest.raises(ConfigError, match="version"):
        job.orchestrator.load_state_dict({"version": 99})
    with pytest.raises(ConfigError, match="unreadable"):
        job.orchestrator.load_state_dict({"version": 1, "decisions": [{"bad": 1}]})


async def test_emitted_messages_fit_the_bus_contracts(job: Job) -> None:
    await job.execute(decision())
    await job.execute(decision(layer="nope"))
    for message in job.emitted:
        raw = Envelope.wrap(message, source="tolaria").encode()
        assert Envelope.decode(raw).message() == message


# ------------------------------------------------------------------------------ providers
async def test_local_provider_compiles_once_per_blueprint_and_host() -> None:
    provider = LocalKernelProvider(esper.LocalKernelRegistry())
    host = esper.HostSignature.of(nn.Linear(8, 8))
    ids = await asyncio.gather(*(provider.kernel_for("low_rank", host, "export") for _ in range(3)))
    again = await provider.kernel_for("low_rank", host, "export")

    assert len(set(ids)) == 1 and again == ids[0]
    assert provider.compiled == 1
    assert provider.registry.lookup(again).blueprint == "low_rank"
    assert isinstance(provider, esper.training.KernelProvider)

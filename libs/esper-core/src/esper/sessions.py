"""`esper.session`: Esper's growth in a training loop the user already has.

    with esper.session(model, optimizer, name="my-run", evaluate=val_accuracy) as run:
        for epoch in range(epochs):
            for x, y in batches:
                optimizer.zero_grad()
                with run.training_step():  # on sampled steps: the layers' statistics
                    loss = loss_fn(model(x), y)
                    loss.backward()
                optimizer.step()
                run.step(loss)  # ramps advance; a sampled step is reported
            run.end_epoch(train_loss=..., val_loss=..., val_accuracy=...)  # decide, apply

The model is wrapped in place (`esper.wrap`): the user's `model` object is the grown model, and
the optimizer gets each seed's parameters in a group of its own (`attach_optimizer`). The end of
every epoch (and every `decide_every_steps` steps, if set) is a decision point, as in a Tolaria
job (#11): the session reports, the controller answers that report, and the decisions are
executed there, before the next step; their answers travel in the next report. Decisions happen
nowhere else, so the same data, model and torch seed give the same decisions at the same steps.

`controller="local"`: the heuristic policy in this process (esper.policy.LocalController, the
code Tamiyo hosts), kernels compiled here into a LocalKernelRegistry. No Redis, no service.

`controller="stack"`: the run is a job of the stack (esper.client.runs.StackController): Tolaria
lists it (kind `external`), relays its reports to Tamiyo and Nissa and Tamiyo's answers back;
a stop asked through the API reaches the loop as `run.should_stop`; leaving the `with` block
ends the job (SUCCEEDED, STOPPED when asked to stop or interrupted, FAILED on an exception).
Kernels come from Urza. The services are found at `ESPER_<SERVICE>_URL` (or `urls`), with
`ESPER_API_TOKEN` (or `token`).

This module is `sessions` (not `session`): `esper.session`, the function, would otherwise be
shadowed by the submodule as soon as anything imported it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from esper._sync import run_sync
from esper.client.calls import ServiceUrls
from esper.client.runs import StackController, UrzaProvider
from esper.contracts import ControlDecision, DecisionTaken, Message, TelemetryReport
from esper.contracts.jobs import HostKind, MorphogenesisSpec, SeedView
from esper.contracts.vocabulary import Identifier
from esper.exceptions import ConfigError, UnknownKernelError
from esper.kernels import KernelCache, tiered_cache
from esper.morphable import MorphableModel, wrap
from esper.policy import LocalController, PolicyConfig
from esper.registry import LocalKernelRegistry
from esper.training import LocalKernelProvider, SeedOrchestrator, TelemetryReporter
from esper.training.providers import KernelProvider
from esper.training.widening import LossOnSample

log = logging.getLogger(__name__)

CONTROLLERS = ("local", "stack")
MAX_REPORTS = 1000
"""Reports a Run keeps (`Run.reports`), newest last: a step report every few steps of a long
run must not grow without bound."""
_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)
SEED_MAX_GRAD_NORM = 1.0
"""Each seed's gradients are clipped to this norm in their own group (as in a Tolaria job), so a
young seed cannot blow up the step."""


@dataclass(frozen=True)
class Decided:
    """One decision the session executed, where, and the job's answer to it."""

    epoch: int
    step: int
    decision: ControlDecision
    taken: DecisionTaken


def session(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    controller: str = "local",
    evaluate: Callable[[], float],
    seeds_per_layer: int = 2,
    max_seeds: int = 4,
    policy: PolicyConfig | None = None,
    decide_every_steps: int | None = None,
    telemetry_every_steps: int | None = 10,
    registry: LocalKernelRegistry | None = None,
    loss_on_sample: LossOnSample | None = None,
    clip_seed_gradients: bool = True,
    epochs: int | None = None,
    urls: ServiceUrls | None = None,
    token: str | None = None,
) -> Run:
    """Wrap `model` in place, attach `optimizer`, and return the `Run` (a context manager).

    `evaluate()` returns a validation metric, higher is better (accuracy, or a negated loss),
    with the model in eval mode: the seeds' contributions are measured with it at every epoch's
    end (it with the seed, minus it with the seed's α forced to 0). `policy`: the thresholds of
    the heuristic policy (default: `PolicyConfig()`). `registry`: where blueprints are compiled
    into kernels (default: a fresh `LocalKernelRegistry()`). `telemetry_every_steps`: a step in
    this many is sampled for the layers' statistics (None: none, and the policy has no layer to
    rank). `loss_on_sample()`: the loss on a fixed batch of training data, with its graph (the
    same batch every call): a widening seed's first weights are then computed from its gradients
    (esper.training.widening); without it they are the compiled ones. `clip_seed_gradients`:
    clip each seed's gradients in an optimizer step pre-hook; turn it off where the optimizer
    computes the gradients inside its step (a closure, as Lightning does) and call
    `run.clip_seed_gradients()` after backward instead. `epochs`: how many the loop will run
    (the stack shows progress against it). `urls`, `token`: the stack's, for
    `controller="stack"`. Raises ConfigError for anything it cannot run with, before touching
    the model; with the stack, a ServiceError when Tolaria refuses the run or cannot be
    reached.
    """
    if controller not in CONTROLLERS:
        raise ConfigError(
            f"controller={controller!r}: 'local' (the heuristic policy in this process) or "
            "'stack' (Tamiyo, through Tolaria)"
        )
    if controller == "stack" and (policy is not None or registry is not None):
        raise ConfigError(
            "with controller='stack', Tamiyo's policy decides and Urza compiles: `policy` and "
            "`registry` are for controller='local'"
        )
    if not callable(evaluate):
        raise ConfigError(
            f"evaluate must be a callable returning a validation metric (higher is better), "
            f"got {evaluate!r}"
        )
    if not isinstance(model, nn.Module) or isinstance(model, MorphableModel):
        raise ConfigError("model must be the user's own nn.Module, not yet wrapped")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if loss_on_sample is not None and not callable(loss_on_sample):
        raise ConfigError(f"loss_on_sample must be a callable or None, got {loss_on_sample!r}")
    if decide_every_steps is not None and (
        isinstance(decide_every_steps, bool) or decide_every_steps < 1
    ):
        raise ConfigError(f"decide_every_steps must be ≥ 1 or None, got {decide_every_steps!r}")
    if telemetry_every_steps is not None and (
        isinstance(telemetry_every_steps, bool) or telemetry_every_steps < 1
    ):
        raise ConfigError(
            f"telemetry_every_steps must be ≥ 1 or None, got {telemetry_every_steps!r}"
        )
    if epochs is not None and (isinstance(epochs, bool) or not 1 <= epochs <= 100_000):
        raise ConfigError(f"epochs must be 1-100000 or None, got {epochs!r}")
    job_id = _job_id(name)
    spec = _spec(seeds_per_layer, max_seeds, decide_every_steps)
    if controller == "stack":
        return _stack_run(
            model,
            optimizer,
            name=job_id,
            spec=spec,
            epochs=epochs,
            urls=urls,
            token=token,
            evaluate=evaluate,
            telemetry_every_steps=telemetry_every_steps,
            loss_on_sample=loss_on_sample,
            clip_seed_gradients=clip_seed_gradients,
        )
    registry = registry if registry is not None else LocalKernelRegistry()
    local = LocalController(
        job_id,
        policy if policy is not None else PolicyConfig(),
        kernel_kind=_kind_in(registry),
    )
    return Run(
        model,
        optimizer,
        job_id=job_id,
        evaluate=evaluate,
        spec=spec,
        controller=local,
        provider=LocalKernelProvider(registry),
        kernels=KernelCache([registry]),
        telemetry_every_steps=telemetry_every_steps,
        loss_on_sample=loss_on_sample,
        clip_seed_gradients=clip_seed_gradients,
    )


def _stack_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    spec: MorphogenesisSpec,
    epochs: int | None,
    urls: ServiceUrls | None,
    token: str | None,
    **options: Any,
) -> Run:
    urls = urls or ServiceUrls.from_env()
    token = token if token is not None else os.environ.get("ESPER_API_TOKEN")
    link = StackController(name=name, spec=spec, epochs=epochs, urls=urls, token=token)
    try:
        return Run(
            model,
            optimizer,
            job_id=link.job_id,
            spec=spec,
            controller=link,
            provider=UrzaProvider(urls.urza, token),
            kernels=tiered_cache(urza_url=urls.urza, urza_token=token),
            **options,
        )
    except BaseException as err:  # registered, but the run never started: its job ends here
        link.end("FAILED", f"{type(err).__name__}: {err}", None, 0)
        raise


def _kind_in(registry: LocalKernelRegistry) -> Callable[[str], HostKind | None]:
    def kind(kernel_id: str) -> HostKind | None:
        try:
            return registry.lookup(kernel_id).host.kind
        except UnknownKernelError:
            return None

    return kind


def _job_id(name: str) -> str:
    try:
        return _IDENTIFIER.validate_python(name)
    except ValidationError:
        raise ConfigError(
            f"name {name!r} is not a valid run name: 1-128 letters, digits and _ . : -, "
            "starting with a letter or digit"
        ) from None


def _spec(
    seeds_per_layer: int, max_seeds: int, decide_every_steps: int | None
) -> MorphogenesisSpec:
    try:
        return MorphogenesisSpec(
            seeds_per_layer=seeds_per_layer,
            max_seeds=max_seeds,
            decide_every_steps=decide_every_steps,
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{field}: {first['msg']}") from None


class Controller(Protocol):
    """Who answers a Run's reports: esper.policy.LocalController, or the stack
    (esper.client.runs.StackController)."""

    @property
    def note(self) -> str: ...

    def answer(self, report: TelemetryReport, events: list[Message]) -> list[ControlDecision]: ...


class Run:
    """A user's training run with Esper's growth; made by `esper.session`.

    Per step: `with run.training_step(): <forward, backward>`, the optimizer's step, then
    `run.step(loss)`. Per epoch: `run.end_epoch(...)`, which returns the decisions' answers.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        job_id: str,
        evaluate: Callable[[], float],
        spec: MorphogenesisSpec,
        controller: Controller,
        provider: KernelProvider,
        kernels: KernelCache,
        telemetry_every_steps: int | None,
        loss_on_sample: LossOnSample | None = None,
        clip_seed_gradients: bool = True,
    ) -> None:
        self.job_id = job_id
        self.evaluate = evaluate
        self.spec = spec
        self.controller = controller
        self.morphable: MorphableModel = wrap(model, spec.seeds_per_layer, kernels=kernels)
        self.model = model
        self.optimizer = optimizer
        self.morphable.attach_optimizer(optimizer, max_grad_norm=SEED_MAX_GRAD_NORM)
        # Seeds' gradients are clipped in their own groups between backward and the step: the
        # user's loop calls neither, so the optimizer does it for them.
        self._clip_hook = (
            optimizer.register_step_pre_hook(self._clip_before_step)
            if clip_seed_gradients
            else None
        )
        self._events: list[Message] = []
        self.orchestrator = SeedOrchestrator(
            self.morphable,
            job_id,
            provider,
            spec,
            self._events.append,
            loss_on_sample=loss_on_sample,
        )
        self.orchestrator.attach()
        self.reports: deque[TelemetryReport] = deque(maxlen=MAX_REPORTS)
        self.reporter = TelemetryReporter(
            self.morphable, job_id, self._publish, every_steps=telemetry_every_steps
        )
        self.decisions: list[Decided] = []
        """Every decision executed, in order, with its answer."""
        self.epoch = 0
        """The epoch running now (0-based): the number of `end_epoch` calls so far."""
        self.global_step = 0
        """Optimizer steps so far (`run.step` calls)."""
        self._unreported: list[DecisionTaken] = []
        self._closed = False
        if isinstance(controller, StackController):
            controller.seeds = self.seeds

    # ------------------------------------------------------------ context
    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        elif isinstance(exc, KeyboardInterrupt):
            self.close("STOPPED", "interrupted")
        else:
            self.close("FAILED", f"{type(exc).__name__}: {exc}")

    def close(self, status: str | None = None, error: str | None = None) -> None:
        """Stop reporting and deciding; with the stack, end the run's job as `status` says
        (default: STOPPED if a stop was asked, else SUCCEEDED). The model keeps its seeds: it
        is the grown model."""
        if self._closed:
            return
        self._closed = True
        self.reporter.cancel_step()
        self.orchestrator.detach()
        if self._clip_hook is not None:
            self._clip_hook.remove()
        if isinstance(self.controller, StackController):
            if status is None:
                status = "STOPPED" if self.should_stop else "SUCCEEDED"
                error = "stopped on request" if self.should_stop else None
            self.controller.end(status, error, None, self.global_step)

    @property
    def should_stop(self) -> bool:
        """Whether a stop was asked through the stack's API (seen at the latest report); never
        with the local controller."""
        return bool(getattr(self.controller, "stop_requested", False))

    def seeds(self) -> list[SeedView]:
        """Every seed out of DORMANT: its layer, slot, state, α, blueprint, contribution."""
        return self.orchestrator.seed_views()

    # -------------------------------------------------------------- steps
    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """Around one step's forward and backward: on a sampled step the layers' statistics are
        collected (and read, with the gradients, in `run.step`)."""
        self.begin_step()
        try:
            yield
        except BaseException:
            self.cancel_step()
            raise

    def begin_step(self) -> None:
        """Before a step's forward (what `training_step` does on entry), for loops whose
        forward and backward are not in one block of the user's code (callbacks)."""
        self._check_open()
        self.orchestrator.on_step(self.global_step)
        self.reporter.begin_step(self.global_step)

    def cancel_step(self) -> None:
        """A step begun and abandoned (an exception, a skipped batch): nothing of it is
        reported."""
        self.reporter.cancel_step()

    def clip_seed_gradients(self) -> None:
        """Clip each seed's gradients to SEED_MAX_GRAD_NORM in its own group: after backward,
        before the optimizer's update (done for you unless `clip_seed_gradients=False`)."""
        if not self.morphable.all_dormant:
            self.morphable.clip_seed_gradients()

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """After each optimizer step: advance the seeds' α ramps, report a sampled step (with
        `loss`), and settle a decision point every `decide_every_steps` steps."""
        self._check_open()
        self.orchestrator.on_step(self.global_step)
        if not self.morphable.all_dormant:
            self.morphable.step()
        self.reporter.end_step(self.global_step, self.epoch, loss)
        self.global_step += 1
        every = self.spec.decide_every_steps
        if every and self.global_step % every == 0:
            report = self.reporter.point_report(
                self.epoch, self.global_step, answers=self._take_answers()
            )
            self._settle(report)

    def end_epoch(
        self,
        *,
        train_loss: float | None = None,
        val_loss: float | None = None,
        val_accuracy: float | None = None,
    ) -> list[DecisionTaken]:
        """The epoch's decision point: measure each seed's contribution with `evaluate`, report,
        get the controller's decisions and execute them; their answers (returned) travel in the
        next report."""
        self._check_open()
        self.reporter.cancel_step()  # a training_step whose run.step never came: not reported
        contributions = self.orchestrator.measure(self.evaluate)
        report = self.reporter.epoch_report(
            epoch=self.epoch,
            step=self.global_step,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            samples_per_s=None,
            contributions=contributions,
            decision_point=True,
            answers=self._take_answers(),
        )
        taken = self._settle(report)
        self.epoch += 1
        return taken

    # ---------------------------------------------------------- internals
    def _settle(self, report: TelemetryReport) -> list[DecisionTaken]:
        events, self._events[:] = list(self._events), []
        decisions = self.controller.answer(report, events)
        taken = []
        for decision in decisions:
            self.orchestrator.on_step(report.step)
            outcome = run_sync(
                self.orchestrator.execute(decision, step=report.step, epoch=report.epoch)
            )
            self.decisions.append(Decided(report.epoch, report.step, decision, outcome))
            taken.append(outcome)
        self._unreported.extend(taken)
        if not decisions:
            log.debug("run %s, point %s: %s", self.job_id, report.point, self.controller.note)
        return taken

    def _publish(self, report: TelemetryReport) -> None:
        self.reports.append(report)
        if not report.decision_point:
            # Sampled steps go to the controller as they would over the bus; they decide nothing.
            events, self._events[:] = list(self._events), []
            self.controller.answer(report, events)

    def _take_answers(self) -> list[DecisionTaken]:
        answers, self._unreported = self._unreported, []
        return answers

    def _clip_before_step(self, *_: Any) -> None:
        self.clip_seed_gradients()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the session of run {self.job_id!r} is closed")

"""SeedOrchestrator: executes control decisions on a MorphableModel inside a training job.

A decision arrives from Tamiyo (or an operator) over the bus; the job's runner hands it to
`execute`, which checks it against the model, gets a kernel (a published id or tag as is, or one
compiled for the blueprint and this layer by a KernelProvider), loads it, starts the α ramp, and
answers with a DecisionTaken. Every lifecycle transition is emitted as a SeedTransition.

The orchestrator knows nothing of HTTP or Redis: it takes a provider and an `emit` callable, so
the same code runs in Tolaria's worker, in a notebook, and in the tests.

Urza away for a moment must not cost a job its growth: a germination whose kernel cannot be
compiled or fetched for want of an answer tries again, with backoff, for the spec's
`kernel_retry_s`; only then is it refused, as `kernel_unreachable` (a code that tells the
controller to decide again later). A failure that would repeat (an unknown blueprint, a compile
error, an artifact that fails verification) is refused at once, as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

import torch

from esper._backoff import Backoff
from esper.contracts.control import ControlDecision
from esper.contracts.envelope import Message
from esper.contracts.events import DecisionTaken, DecisionTakenV1, RefusalCode, SeedTransition
from esper.contracts.jobs import MorphogenesisSpec, SeedView
from esper.contracts.telemetry import finite_or_none
from esper.contracts.vocabulary import KernelFormat, SeedStateName, clip
from esper.exceptions import ConfigError, ServiceError, is_transient
from esper.kasmina.layer import KasminaLayer, SeedInfo
from esper.kasmina.lifecycle import LifecycleEvent
from esper.kasmina.state import RUNNING_STATES, SeedState
from esper.morphable import MorphableModel
from esper.training.providers import KernelProvider
from esper.training.widening import LossOnSample, init_from_gradients

log = logging.getLogger(__name__)

SeedKey = tuple[str, int]
STATE_VERSION = 1
T = TypeVar("T")

RETRY_BASE_S = 0.25
"""The first wait before a kernel compile or fetch is tried again; waits double up to
RETRY_CAP_S, jittered, and never run past the decision's deadline."""
RETRY_CAP_S = 2.0


@dataclass
class SeedRecord:
    """What the orchestrator knows about a seed beyond the model's own state: where it came from
    (the model keeps only the kernel id) and what was decided about it."""

    layer: str
    seed: int
    kernel_id: str | None
    blueprint: str | None = None
    decision_id: str | None = None
    germinated_step: int | None = None
    germinated_epoch: int | None = None
    kept_step: int | None = None
    kept_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedRecord:
        return cls(**data)


class _GaveUp(Exception):
    """Transient failures went on until the decision's deadline: `last` is the latest."""

    def __init__(self, last: Exception, attempts: int, waited_s: float) -> None:
        super().__init__(
            f"unreachable for {waited_s:.1f} s ({attempts} attempt{'s' if attempts > 1 else ''}); "
            f"last: {type(last).__name__}: {last}"
        )
        self.last = last


class _Refusal(Exception):
    """Flow control inside execute(): the decision cannot be applied, for `code` and `reason`."""

    def __init__(self, code: RefusalCode, reason: str, seed: int | None = None) -> None:
        super().__init__(reason)
        self.code: RefusalCode = code
        self.reason = reason
        self.seed = seed


class SeedOrchestrator:
    """Applies ControlDecisions to one job's MorphableModel and keeps per-seed records.

    The runner calls `attach()` once, `on_step(step)` as training advances (so transition events
    carry the step), `execute(decision, step=, epoch=)` for each decision, `measure(evaluate)` at
    evaluation time, and stores `state_dict()` in its checkpoints next to the model's.

    Decisions are executed one at a time (an asyncio lock), so two germinations in flight cannot
    pick the same free slot or both slip under `max_seeds`. The model must not be stepping while a
    decision is applied; the runner awaits `execute` between optimizer steps.
    """

    def __init__(
        self,
        morphable: MorphableModel,
        job_id: str,
        provider: KernelProvider,
        spec: MorphogenesisSpec,
        emit: Callable[[Message], None],
        *,
        kernel_format: KernelFormat | None = None,
        default_alpha: float = 1.0,
        max_remembered: int = 10_000,
        loss_on_sample: LossOnSample | None = None,
    ) -> None:
        if max_remembered < 1:
            raise ConfigError(f"max_remembered must be ≥ 1, got {max_remembered}")
        if not 0.0 <= default_alpha <= 1.0:
            raise ConfigError(f"default_alpha must be in [0, 1], got {default_alpha}")
        self.morphable = morphable
        self.job_id = job_id
        self.provider = provider
        self.spec = spec
        self.emit = emit
        # None: the job's own choice (spec.kernel_format), so a spec asking for TorchScript gets it.
        self.kernel_format: KernelFormat = kernel_format or spec.kernel_format
        self.default_alpha = default_alpha
        self.max_remembered = max_remembered
        # For a widening seed's data-driven fan-in (esper.training.widening); None: as compiled.
        self.loss_on_sample = loss_on_sample
        self.step = 0
        # Decision id → the answer given; oldest first, so the bound forgets the oldest.
        self._outcomes: OrderedDict[str, DecisionTaken] = OrderedDict()
        self._records: dict[SeedKey, SeedRecord] = {}
        self._lock = asyncio.Lock()
        self._attached = False

    # ------------------------------------------------------------ events
    def attach(self) -> None:
        """Emit a SeedTransition for every lifecycle transition of the model's seeds from now on
        (calling it again does not register a second listener)."""
        if self._attached:
            return
        self.morphable.add_listener(self._on_transition)
        self._attached = True

    def detach(self) -> None:
        """Stop emitting transitions (a replaced orchestrator must not report twice)."""
        if not self._attached:
            return
        for layer in self.morphable.layers.values():
            listeners = layer.lifecycle.listeners
            listeners[:] = [fn for fn in listeners if fn != self._on_transition]
        self._attached = False

    def on_step(self, step: int) -> None:
        """The step now running. Call it before each step's forward: transitions inside the step
        (a ramp ending in `morphable.step()`, the circuit breaker in forward) then carry it."""
        self.step = step

    def _on_transition(self, event: LifecycleEvent) -> None:
        self._send(SeedTransition.from_lifecycle(event, self.job_id, self.step))

    def _send(self, message: Message) -> None:
        # A failing publisher must not stop training nor leave a decision half-answered; the
        # lifecycle manager treats its listeners the same way.
        try:
            self.emit(message)
        except Exception:
            log.exception("job %s: emitting %s failed", self.job_id, message.TYPE)

    # --------------------------------------------------------- decisions
    def outcome(self, decision_id: str) -> DecisionTaken | None:
        """The answer already given to `decision_id`, if it is still remembered."""
        return self._outcomes.get(decision_id)

    async def execute(self, decision: ControlDecision, *, step: int, epoch: int) -> DecisionTaken:
        """Apply `decision` and return (and emit) the DecisionTaken.

        Never raises for a decision that cannot be applied: the answer is `refused`, with a reason
        that names the problem, and the model is left as it was. A decision id answered before
        returns that answer again, without acting and without emitting it a second time.
        """
        earlier = self._outcomes.get(decision.decision_id)
        if earlier is not None:
            return earlier
        async with self._lock:
            earlier = self._outcomes.get(decision.decision_id)  # the same id was in flight
            if earlier is not None:
                return earlier
            self.step = step
            try:
                outcome = await self._apply(decision, step, epoch)
            except Exception as err:  # a bug here must not end the job; the answer says what broke
                log.exception("job %s: decision %s failed", self.job_id, decision.decision_id)
                outcome = DecisionTaken.refused(
                    decision,
                    "internal",
                    f"internal error: {type(err).__name__}: {err}",
                    job_id=self.job_id,
                )
            self._remember(outcome)
        if outcome.outcome == "applied":
            log.info(
                "job %s: decision %s applied: %s", self.job_id, outcome.decision_id, outcome.reason
            )
        else:
            log.warning(
                "job %s: decision %s refused: %s", self.job_id, outcome.decision_id, outcome.reason
            )
        self._send(outcome)
        return outcome

    def _remember(self, outcome: DecisionTaken) -> None:
        self._outcomes[outcome.decision_id] = outcome
        while len(self._outcomes) > self.max_remembered:
            self._outcomes.popitem(last=False)

    def _applied(self, decision: ControlDecision, reason: str, seed: int) -> DecisionTaken:
        return DecisionTaken(
            decision_id=decision.decision_id,
            job_id=self.job_id,
            action=decision.action,
            outcome="applied",
            reason=clip(reason),
            layer=decision.layer,
            seed=seed,
        )

    async def _apply(self, d: ControlDecision, step: int, epoch: int) -> DecisionTaken:
        try:
            if d.job_id != self.job_id:
                raise _Refusal(
                    "wrong_job",
                    f"decision {d.decision_id} is for job {d.job_id!r}, not for this job "
                    f"{self.job_id!r}",
                    d.seed,
                )
            kl = self._layer(d)
            if d.action == "germinate":
                slot, reason = await self._germinate(d, kl, step, epoch)
            elif d.action == "retire":
                slot, reason = self._retire(d, kl)
            elif d.action == "keep":
                slot, reason = self._keep(d, kl, step, epoch)
            else:
                slot, reason = self._set_alpha(d, kl)
        except _Refusal as refusal:
            # The answer carries this job's id, which is true of who answered; for a decision
            # sent to another job the reason names both.
            return DecisionTaken.refused(
                d, refusal.code, refusal.reason, job_id=self.job_id, seed=refusal.seed
            )
        return self._applied(d, reason, slot)

    def _layer(self, d: ControlDecision) -> KasminaLayer:
        names = self.morphable.layer_names()
        if d.layer not in names:
            raise _Refusal(
                "unknown_layer",
                f"unknown layer {d.layer!r}; wrapped layers: {', '.join(names)}",
                d.seed,
            )
        return self.morphable.layer(d.layer)

    @staticmethod
    def _slot(d: ControlDecision, kl: KasminaLayer) -> int:
        if d.seed is None:
            raise _Refusal("invalid_seed", f"{d.action} names no seed of layer {kl.layer_name!r}")
        if d.seed >= kl.num_seeds:
            raise _Refusal(
                "invalid_seed",
                f"seed {d.seed} is out of range: layer {kl.layer_name!r} has {kl.num_seeds} "
                f"seed slots (0-{kl.num_seeds - 1})",
                d.seed,
            )
        return d.seed

    @staticmethod
    def _describe(info: SeedInfo) -> str:
        kernel = f" (kernel {info.kernel_id})" if info.kernel_id else ""
        return f"seed {info.seed} of layer {info.layer!r} is {info.state.name}{kernel}"

    def _require_active(self, d: ControlDecision, kl: KasminaLayer) -> int:
        slot = self._slot(d, kl)
        info = kl.seed_info(slot)
        if info.state is not SeedState.ACTIVE:
            raise _Refusal(
                "seed_state", f"cannot {d.action}: {self._describe(info)}, not ACTIVE", slot
            )
        return slot

    async def _germinate(
        self, d: ControlDecision, kl: KasminaLayer, step: int, epoch: int
    ) -> tuple[int, str]:
        name = kl.layer_name
        if not self.spec.enabled:
            raise _Refusal("morphogenesis_off", "morphogenesis is disabled for this job", d.seed)
        if d.seed is None:
            free = kl.free_seeds()
            if not free:
                states = ", ".join(kl.seed_info(i).state.name for i in range(kl.num_seeds))
                raise _Refusal(
                    "no_free_slot", f"no free seed slot in layer {name!r} (slots: {states})"
                )
            slot = free[0]
        else:
            slot = self._slot(d, kl)
            info = kl.seed_info(slot)
            if info.state is not SeedState.DORMANT:
                raise _Refusal(
                    "seed_state",
                    f"cannot germinate: {self._describe(info)}, not DORMANT; retire it first",
                    slot,
                )
        held = sum(1 for s in self.morphable.seeds() if s.state is not SeedState.DORMANT)
        if held >= self.spec.max_seeds:
            raise _Refusal(
                "max_seeds",
                f"max_seeds reached: the job holds {held} seed(s) and max_seeds is "
                f"{self.spec.max_seeds}",
                slot,
            )

        # One budget for the compile and the fetch: the job's training waits on this decision.
        deadline = asyncio.get_running_loop().time() + self.spec.kernel_retry_s
        if d.kernel is not None:
            kernel_ref = d.kernel  # a published id or tag: the hot-swap case, loaded as is
        else:
            assert d.blueprint is not None  # the contract requires exactly one of the two
            blueprint = d.blueprint
            what = (
                f"no kernel for blueprint {blueprint!r} on layer {name!r} "
                f"({kl.signature.kind} {kl.signature.in_features}→{kl.signature.out_features})"
            )
            # A layer that can be widened is offered with its downstream layer: a widening
            # blueprint compiles for both, any other for the layer alone.
            host = kl.widening_signature or kl.signature
            try:
                kernel_ref = await self._patiently(
                    lambda: self.provider.kernel_for(blueprint, host, self.kernel_format),
                    deadline,
                    f"compiling {blueprint!r} for layer {name!r}",
                )
            except _GaveUp as gave_up:
                raise _Refusal("kernel_unreachable", f"{what}: {gave_up}", slot) from None
            except Exception as err:
                raise _Refusal(
                    "kernel_unavailable", f"{what}: {type(err).__name__}: {err}", slot
                ) from None

        try:
            # Fetched before the slot is touched, so an outage ridden out here leaves no trace of
            # failed loads; the load below then finds the kernel in the memory cache.
            cached = await self._patiently(
                lambda: self.morphable.kernels.get(kernel_ref), deadline, f"fetching {kernel_ref}"
            )
            kernel_ref = cached.meta.kernel_id
        except _GaveUp as gave_up:
            raise _Refusal(
                "kernel_unreachable",
                f"kernel {kernel_ref} for seed {slot} of layer {name!r} could not be fetched: "
                f"{gave_up}",
                slot,
            ) from None
        except Exception:
            pass  # for good: the load below meets the same error and refuses as load_failed

        blend = d.blend or self.spec.blend
        try:
            # On failure the lifecycle returns the slot to DORMANT and says why in an event.
            info = await self.morphable.load_kernel(
                name, slot, kernel_ref, blend=blend, grad_isolation=self.spec.grad_isolation
            )
        except Exception as err:
            # Unreachable again after the fetch above (a kernel too large for the memory cache
            # is fetched anew): still not the kernel's fault.
            raise _Refusal(
                "kernel_unreachable" if is_transient(err) else "load_failed",
                f"loading kernel {kernel_ref} into seed {slot} of layer {name!r} failed: "
                f"{type(err).__name__}: {err}",
                slot,
            ) from None

        init = self._init_widening(kl, slot) if info.widens else ""
        target = self.default_alpha if d.alpha is None else d.alpha
        steps = d.ramp_steps or self.spec.ramp_steps
        try:
            self._move_alpha(name, slot, target, steps)
        except Exception as err:
            # The kernel loaded but cannot reach its α (the lerp budget of the layer, say): a
            # germination is all or nothing, so the seed leaves again rather than idle at α=0.
            self.morphable.unload_seed(name, slot, reason=f"decision {d.decision_id}: {err}")
            raise _Refusal(
                "alpha_rejected",
                f"cannot ramp seed {slot} of layer {name!r} to α={target}: "
                f"{type(err).__name__}: {err}",
                slot,
            ) from None

        key = (name, slot)
        self._records[key] = SeedRecord(
            layer=name,
            seed=slot,
            kernel_id=info.kernel_id,
            blueprint=d.blueprint,
            decision_id=d.decision_id,
            germinated_step=step,
            germinated_epoch=epoch,
        )
        source = f"blueprint {d.blueprint}" if d.blueprint else f"kernel {d.kernel}"
        ramp = f"over {steps} steps" if steps else "at once"
        widening = f", widening into {kl.next_layer!r}: {init}" if info.widens else ""
        return slot, (
            f"germinated seed {slot} of layer {name!r} from {source} as {info.kernel_id} "
            f"(blend {info.blend.value}{widening}); α → {target} {ramp}"
        )

    def _init_widening(self, kl: KasminaLayer, slot: int) -> str:
        """The widening seed's fan-in from the job's sample; what was done, for the reason."""
        if self.loss_on_sample is None:
            return "fan-in as compiled (the job gives no sample to start it from)"
        try:
            return init_from_gradients(kl, slot, self.loss_on_sample)
        except Exception as err:  # the seed is still function-preserving: it trains as compiled
            log.warning("data init of seed %d of layer %r failed: %s", slot, kl.layer_name, err)
            return f"fan-in as compiled (the data init failed: {type(err).__name__}: {err})"

    async def _patiently(self, call: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
        """`call()`, tried again with backoff while it fails transiently (no answer, 429, 502-504,
        the kernel tier's circuit open) and `deadline` (loop time) allows; the first try is
        always made. A permanent failure is raised as it is, at once; transient failures that
        outlast the deadline end in _GaveUp. A try already running at the deadline is bounded by
        its client's own timeout, not cut short."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        backoff = Backoff(RETRY_BASE_S, RETRY_CAP_S, floor_s=RETRY_BASE_S)
        attempts = 0
        while True:
            try:
                return await call()
            except Exception as err:
                if not is_transient(err):
                    raise
                attempts += 1
                left = deadline - loop.time()
                if left <= 0:
                    raise _GaveUp(err, attempts, loop.time() - started) from None
                delay = backoff.delay(attempts - 1)
                if isinstance(err, ServiceError) and err.retry_after_s:
                    delay = max(delay, err.retry_after_s)  # the server said when to come back
                delay = min(delay, left)  # one last try at the deadline
                log.warning(
                    "job %s: %s failed (%s: %s); try %d again in %.2f s",
                    self.job_id,
                    what,
                    type(err).__name__,
                    err,
                    attempts + 1,
                    delay,
                )
                await asyncio.sleep(delay)

    def _move_alpha(self, layer: str, slot: int, target: float, steps: int) -> None:
        if steps > 0:
            self.morphable.ramp_seed_alpha(layer, slot, target, steps)
        else:
            self.morphable.set_seed_alpha(layer, slot, target)

    def _retire(self, d: ControlDecision, kl: KasminaLayer) -> tuple[int, str]:
        slot = self._require_active(d, kl)
        try:
            self.morphable.retire_seed(
                kl.layer_name,
                slot,
                ramp_steps=d.ramp_steps,
                reason=f"decision {d.decision_id}: {d.reason}",
            )
        except Exception as err:
            # retire() re-checks the state it was called in; ACTIVE was checked just above.
            raise _Refusal(
                "seed_state", f"cannot retire: {type(err).__name__}: {err}", slot
            ) from None
        ramp = f"α → 0 over {d.ramp_steps} steps" if d.ramp_steps else "at once"
        return slot, f"retiring seed {slot} of layer {kl.layer_name!r}, {ramp}"

    def _keep(self, d: ControlDecision, kl: KasminaLayer, step: int, epoch: int) -> tuple[int, str]:
        slot = self._require_active(d, kl)
        info = kl.seed_info(slot)
        record = self._record_for(info)
        if record is None:  # a seed loaded outside the orchestrator: start its record here
            record = SeedRecord(layer=info.layer, seed=slot, kernel_id=info.kernel_id)
            self._records[(info.layer, slot)] = record
        record.kept_step = step
        record.kept_epoch = epoch
        return slot, f"keeping seed {slot} of layer {kl.layer_name!r}"

    def _set_alpha(self, d: ControlDecision, kl: KasminaLayer) -> tuple[int, str]:
        slot = self._require_active(d, kl)
        assert d.alpha is not None  # the contract requires it for set_alpha
        try:
            self._move_alpha(kl.layer_name, slot, d.alpha, d.ramp_steps)
        except Exception as err:
            raise _Refusal(
                "alpha_rejected", f"cannot set α: {type(err).__name__}: {err}", slot
            ) from None
        ramp = f"over {d.ramp_steps} steps" if d.ramp_steps else "at once"
        return slot, f"α of seed {slot} of layer {kl.layer_name!r} → {d.alpha} {ramp}"

    # ------------------------------------------------------- seed records
    def _record_for(self, info: SeedInfo) -> SeedRecord | None:
        """The record of the seed now in this slot, or None. A record outlives its seed until
        looked at: when the slot went DORMANT or holds another kernel (the circuit breaker, a
        checkpoint, a direct load_kernel), it is stale and is dropped here."""
        key = (info.layer, info.seed)
        record = self._records.get(key)
        if record is None:
            return None
        if info.state is SeedState.DORMANT or record.kernel_id != info.kernel_id:
            del self._records[key]
            return None
        return record

    def records(self) -> dict[SeedKey, SeedRecord]:
        """Records of the seeds now in the model, by (layer, seed)."""
        live = {}
        for info in self.morphable.seeds():
            record = self._record_for(info)
            if record is not None:
                live[(info.layer, info.seed)] = record
        return live

    # --------------------------------------------------------- measuring
    def measure(self, evaluate: Callable[[], float]) -> dict[SeedKey, float]:
        """The counterfactual contribution of every ACTIVE or RETIRING seed: `evaluate()` with
        the seed minus `evaluate()` with its α forced to 0. `evaluate` returns a metric where
        higher is better (accuracy, or a negated loss) and should be deterministic (the runner
        puts the model in eval mode): its noise would read as contribution.

        The with-seed value is the same for every seed, so it is evaluated once: n + 1 passes
        rather than the 2n of calling MorphableModel.measure_contribution per seed. Each value is
        recorded in the model (its layer keeps it, and checkpoints carry it), a non-finite one
        too: a diverged measurement must not leave an earlier one standing.
        """
        running = [s for s in self.morphable.seeds() if s.state in RUNNING_STATES]
        if not running:
            return {}
        results: dict[SeedKey, float] = {}
        with torch.no_grad():
            with_seeds = float(evaluate())
            for info in running:
                with self.morphable.seed_alpha_forced(info.layer, info.seed, 0.0):
                    without = float(evaluate())
                value = with_seeds - without
                results[(info.layer, info.seed)] = value
                self.morphable.record_contribution(info.layer, info.seed, value)
        return results

    def contributions(self) -> dict[SeedKey, float]:
        """The last recorded contribution of each seed now in the model that has one, as the
        model keeps it (a measurement that diverged to NaN reads as none)."""
        return {
            (info.layer, info.seed): value
            for info in self.morphable.seeds()
            if info.state is not SeedState.DORMANT
            and not math.isnan(value := self.morphable.contribution(info.layer, info.seed))
        }

    def seed_views(self) -> list[SeedView]:
        """Every non-DORMANT seed as Tolaria's job view shows it."""
        views = []
        for info in self.morphable.seeds():
            if info.state is SeedState.DORMANT:
                continue
            record = self._record_for(info)
            # Whoever measured it (this orchestrator, MorphableModel.measure_contribution, or
            # the run a checkpoint was saved from): the model keeps the one value.
            contribution = self.morphable.contribution(info.layer, info.seed)
            views.append(
                SeedView(
                    layer=info.layer,
                    seed=info.seed,
                    state=cast(SeedStateName, info.state.name),
                    alpha=min(1.0, max(0.0, info.alpha)),
                    kernel_id=info.kernel_id,
                    blueprint=record.blueprint if record else None,
                    contribution=finite_or_none(contribution),
                    germinated_epoch=record.germinated_epoch if record else None,
                )
            )
        return views

    # -------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for a checkpoint: the answered decisions (so a resumed job
        does not execute one twice) and the seed records (so it still knows each seed's
        blueprint). The model's checkpoint carries the contributions; they are also written here,
        when finite (JSON has no NaN), for earlier versions, which read them from here."""
        records = self.records()
        return {
            "version": STATE_VERSION,
            "job_id": self.job_id,
            "step": self.step,
            "decisions": [o.model_dump(mode="json") for o in self._outcomes.values()],
            "seeds": [r.to_dict() for r in records.values()],
            "contributions": [
                [layer, seed, value]
                for (layer, seed), value in self.contributions().items()
                if math.isfinite(value)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this orchestrator's decisions and records by a checkpoint's. Load the model's
        state_dict first: it restores the contributions (the copy in `state` is not read), and
        records of seeds the model no longer holds are dropped the next time they are looked
        at."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ConfigError(
                f"unreadable orchestrator state (version {version!r}, expected {STATE_VERSION})"
            )
        try:
            outcomes = [_stored_answer(o) for o in state["decisions"]]
            records = [SeedRecord.from_dict(r) for r in state["seeds"]]
            step = int(state["step"])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ConfigError(f"unreadable orchestrator state: {err}") from None
        self._outcomes = OrderedDict((o.decision_id, o) for o in outcomes)
        while len(self._outcomes) > self.max_remembered:
            self._outcomes.popitem(last=False)
        self._records = {(r.layer, r.seed): r for r in records}
        self.step = step


def _stored_answer(data: dict[str, Any]) -> DecisionTaken:
    # A checkpoint written before refusals had a code holds v1 answers (no `code` key): read them
    # through their contract, which derives the code.
    if "code" in data:
        return DecisionTaken.model_validate(data)
    return DecisionTakenV1.model_validate(data).upgrade()

"""KasminaLayer: a host layer with N seed slots that kernels are hot-loaded into and blended with.

    y = (1 - Σ_lerp α_i)·host(x) + Σ_lerp α_i·k_i(x) + Σ_add α_j·k_j(x)

Which seeds run is Python-side state (`_running_lerp`, `_running_add`), changed only by
`_refresh_running()` after a lifecycle transition. α is a buffer updated in place (`fill_`), which
a `torch.compile`d model reads, so it survives α changes without recompiling, as PEFT does with
LoRA scalings; eager forwards take α by value from its Python mirror (one fused add per seed).

With `dormant_bypass` on, a layer none of whose seeds runs has the host's bound `forward` as its
own instance `forward`, so nn.Module.__call__ goes straight to the host: one module call less per
layer per step, ~1.5 % of a tiny MLP's step. Hooks registered on `base_layer` itself then run only
while a seed runs (hooks on the KasminaLayer always run), which is why it is off by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.exceptions import (
    AlphaRangeError,
    ConfigError,
    KernelDtypeError,
    KernelShapeError,
    LerpBudgetError,
    SeedIndexError,
    SeedStateError,
)
from esper.kasmina.lifecycle import LifecycleManager
from esper.kasmina.schedule import AlphaRamp, RampShape
from esper.kasmina.state import RUNNING_STATES, BlendMode, SeedState, StateLayout
from esper.signature import HostSignature

log = logging.getLogger(__name__)

LERP_TOLERANCE = 1e-6
# Given a kernel id and the layer it is for, returns a module ready to attach (checkpoint restore).
KernelLoader = Callable[[str, "KasminaLayer"], nn.Module]


@dataclass(frozen=True)
class SeedInfo:
    layer: str
    seed: int
    state: SeedState
    alpha: float
    kernel_id: str | None
    blend: BlendMode
    grad_isolation: bool
    last_error: str | None


class KasminaLayer(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        num_seeds: int = 4,
        *,
        name: str = "",
        guard_nonfinite: bool = True,
        error_threshold: int = 3,
        dormant_bypass: bool = False,
    ) -> None:
        super().__init__()
        if num_seeds < 1:
            raise ConfigError(f"num_seeds must be ≥ 1, got {num_seeds}")
        if error_threshold < 1:
            raise ConfigError(f"error_threshold must be ≥ 1, got {error_threshold}")
        self.signature = HostSignature.of(base_layer)
        self.base_layer = base_layer
        self.layout = StateLayout(num_seeds)
        self.seeds = nn.ModuleDict()
        self.layer_name = name
        self.num_seeds = num_seeds
        self.guard_nonfinite = guard_nonfinite
        self.error_threshold = error_threshold
        self.kernel_loader: KernelLoader | None = None
        self.recycled = 0  # slots recycled so far; owners compare it to notice retirements cheaply
        # Python mirrors of the layout: forward decides from these, never from device tensors.
        self._states = [SeedState.DORMANT] * num_seeds
        self._alphas = [0.0] * num_seeds
        self._kernel_ids: list[str | None] = [None] * num_seeds
        self._blend = [BlendMode.ADD] * num_seeds
        self._isolate = [False] * num_seeds
        self._modules_by_seed: list[nn.Module | None] = [None] * num_seeds
        # Seeds are called through their bound forward: nn.Module.__call__ (hooks, and for an
        # exported GraphModule its call wrapper) costs ~100 µs a call, more than a small seed's
        # compute. Hooks registered on a seed module therefore do not run.
        self._seed_calls: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None] * num_seeds
        self._errors = [0] * num_seeds
        self._last_error: list[str | None] = [None] * num_seeds
        self._ramps: dict[int, AlphaRamp] = {}
        self._running_lerp: tuple[int, ...] = ()
        self._running_add: tuple[int, ...] = ()
        self.lifecycle = LifecycleManager(name, self.layout, self._states)
        self._dormant_bypass = dormant_bypass
        self._route()

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self._running_lerp or self._running_add):
            return self.base_layer(x)  # dormant fast path: no extra op, no sync
        host = self.base_layer(x)
        if torch.compiler.is_compiling():
            return self._blend_from_buffer(x, host)
        # α by value from the Python mirror: one fused add per seed instead of a clone, an index
        # and a multiply (~2 % of a 512-wide MLP's step). Taken before any seed runs: α may be
        # written before backward does (a ramp, seed_alpha_forced, or the breaker tripping inside
        # this very forward), and this output must be the one computed with the α read here.
        alphas = self._alphas.copy()
        out = host
        if self._running_lerp:
            out = host * (1.0 - sum(alphas[i] for i in self._running_lerp))
            for i in self._running_lerp:
                out = torch.add(out, self._seed_output(i, x, host, lerp=True), alpha=alphas[i])
        for i in self._running_add:
            out = torch.add(out, self._seed_output(i, x, host, lerp=False), alpha=alphas[i])
        return out

    def _blend_from_buffer(self, x: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """The blend under torch.compile: α is read from the buffer, so a compiled graph keeps
        working when α changes instead of recompiling for each new constant."""
        alpha = self.layout.alpha.clone()  # a snapshot, for the reason given in forward
        out = host
        if self._running_lerp:
            host_weight = 1.0 - alpha[self._running_lerp[0]]
            for i in self._running_lerp[1:]:
                host_weight = host_weight - alpha[i]
            out = host_weight * host
            for i in self._running_lerp:
                out = out + alpha[i] * self._seed_output(i, x, host, lerp=True)
        for i in self._running_add:
            out = out + alpha[i] * self._seed_output(i, x, host, lerp=False)
        return out

    def _seed_output(self, i: int, x: torch.Tensor, host: torch.Tensor, lerp: bool) -> torch.Tensor:
        module = self._seed_calls[i]
        assert module is not None
        seed_in = x.detach() if self._isolate[i] else x
        try:
            if self.signature.kind == "linear" and seed_in.dim() != 2:
                # Kernels are exported for [batch, features]; fold any leading dims into batch.
                k = module(seed_in.reshape(-1, self.signature.in_features)).reshape(host.shape)
            elif self.signature.kind == "conv2d" and seed_in.dim() == 3:
                # An unbatched [C, H, W] input, which nn.Conv2d accepts: kernels expect a batch.
                k = module(seed_in.unsqueeze(0)).squeeze(0)
            else:
                k = module(seed_in)
            if k.shape != host.shape:
                raise KernelShapeError(f"output shape {tuple(k.shape)} != host {tuple(host.shape)}")
            if k.dtype != host.dtype:
                raise KernelDtypeError(f"output dtype {k.dtype} != host {host.dtype}")
        except Exception as err:
            self._record_exception(i, err)
            return host if lerp else torch.zeros_like(host)
        if not self.guard_nonfinite:
            return k
        # One reduction tells whether any element is NaN/inf. On the CPU reading it costs nothing,
        # so the check branches in Python and a healthy seed pays no elementwise pass. On an
        # accelerator (or inside torch.compile) reading it would sync: the fallback is selected on
        # the device instead and the count is read later by poll_health().
        finite = torch.isfinite(k.sum(dtype=torch.float32))
        if k.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(finite):
                return k
            self._record_error(i, "non-finite output")
            return host if lerp else torch.zeros_like(host)
        self.layout.error_count[i] += ~finite
        return torch.where(finite, k, host) if lerp else torch.where(finite, k, 0.0)

    def _record_exception(self, i: int, err: Exception) -> None:
        self._record_error(i, f"{type(err).__name__}: {err}")

    def _record_error(self, i: int, message: str) -> None:
        """Count an error seen in Python (an exception, or a non-finite output read on the CPU);
        at the threshold the circuit breaker retires the seed at once."""
        self._errors[i] += 1
        self._last_error[i] = message
        self.layout.error_count[i] += 1
        log.warning(
            "seed %d of layer %r fell back to the host output (%s)", i, self.layer_name, message
        )
        if self._errors[i] >= self.error_threshold and self._states[i] in RUNNING_STATES:
            self._trip(i, f"{self._errors[i]} errors, last: {message}")

    # ----------------------------------------------------------- introspection
    def check_index(self, seed: int) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < self.num_seeds:
            raise SeedIndexError(self.layer_name, seed, self.num_seeds)

    def seed_info(self, seed: int) -> SeedInfo:
        self.check_index(seed)
        return SeedInfo(
            self.layer_name,
            seed,
            self._states[seed],
            self._alphas[seed],
            self._kernel_ids[seed],
            self._blend[seed],
            self._isolate[seed],
            self._last_error[seed],
        )

    def seed_module(self, seed: int) -> nn.Module | None:
        self.check_index(seed)
        return self._modules_by_seed[seed]

    def free_seeds(self) -> list[int]:
        return [i for i, s in enumerate(self._states) if s is SeedState.DORMANT]

    @property
    def all_dormant(self) -> bool:
        """Every slot empty: a step has nothing to advance (list.count runs in C, so this check
        is cheap enough to make once per layer per training step)."""
        return self._states.count(SeedState.DORMANT) == len(self._states)

    def running_seeds(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self._states) if s in RUNNING_STATES)

    def _describe(self, seed: int) -> str:
        kid = self._kernel_ids[seed]
        return f"seed {seed} of layer {self.layer_name!r} is {self._states[seed].name}" + (
            f" (kernel {kid})" if kid else ""
        )

    # ---------------------------------------------------------------------- α
    def check_alpha(self, seed: int, alpha: float, blend: BlendMode | None = None) -> None:
        """Raise unless `alpha` is a legal α for `seed` (in [0, 1], and within the lerp budget)."""
        if (
            not isinstance(alpha, int | float)
            or isinstance(alpha, bool)
            or not math.isfinite(alpha)
            or not 0 <= alpha <= 1
        ):
            raise AlphaRangeError(
                f"α={alpha!r} for seed {seed} of layer {self.layer_name!r} is outside [0, 1]"
            )
        if (blend or self._blend[seed]) is BlendMode.LERP:
            others = sum(
                max(self._alphas[j], self._ramps[j].target if j in self._ramps else 0.0)
                for j in self.running_seeds()
                if j != seed and self._blend[j] is BlendMode.LERP
            )
            if others + alpha > 1 + LERP_TOLERANCE:
                raise LerpBudgetError(
                    f"Σ α of lerp seeds in layer {self.layer_name!r} would be {others + alpha:.4f} "
                    f"> 1 (seed {seed} asks α={alpha}, the other lerp seeds hold {others:.4f})"
                )

    def set_alpha(self, seed: int, alpha: float) -> None:
        self.check_index(seed)
        if self._states[seed] is SeedState.RETIRING:
            # Writing α would cancel the retirement ramp and leave the seed RETIRING for good.
            raise SeedStateError(f"cannot set α: {self._describe(seed)}")
        if self._states[seed] is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot set α: {self._describe(seed)}; load a kernel first")
        self.check_alpha(seed, alpha)
        self._ramps.pop(seed, None)
        self._write_alpha(seed, float(alpha))

    def _write_alpha(self, seed: int, alpha: float) -> None:
        self._alphas[seed] = alpha
        self.layout.alpha[seed].fill_(alpha)  # in place: compiled graphs keep reading the buffer

    @contextlib.contextmanager
    def alpha_forced(self, seed: int, alpha: float) -> Iterator[None]:
        """Run as if the seed's α were `alpha`, then put its α back (no checks of state or lerp
        budget: a counterfactual evaluation, see MorphableModel.seed_alpha_forced)."""
        self.check_index(seed)
        saved = self._alphas[seed]
        self._write_alpha(seed, float(alpha))
        try:
            yield
        finally:
            self._write_alpha(seed, saved)

    def start_ramp(self, seed: int, target: float, steps: int, shape: RampShape = "linear") -> None:
        self.check_index(seed)
        if self._states[seed] is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot ramp α: {self._describe(seed)}")
        self.check_alpha(seed, target)
        self._ramps[seed] = AlphaRamp(self._alphas[seed], float(target), steps, shape)

    # -------------------------------------------------------------- lifecycle
    def begin_load(self, seed: int, reason: str) -> None:
        """DORMANT → ALLOCATED. The caller then fetches the kernel and calls mark_loading/attach."""
        self.check_index(seed)
        if self._states[seed] is not SeedState.DORMANT:
            raise SeedStateError(f"cannot load: {self._describe(seed)}; retire it first")
        self.lifecycle.transition(seed, SeedState.ALLOCATED, reason)

    def mark_loading(self, seed: int, kernel_id: str) -> None:
        self.check_index(seed)
        reason = f"fetching kernel {kernel_id}"
        self.lifecycle.transition(seed, SeedState.LOADING, reason, kernel_id)
        self._kernel_ids[seed] = kernel_id

    def fail_load(self, seed: int, reason: str) -> None:
        self.check_index(seed)
        self.lifecycle.check(seed, SeedState.DORMANT)  # before any write: ACTIVE → DORMANT raises
        kernel_id = self._kernel_ids[seed]
        self._kernel_ids[seed] = None
        self.lifecycle.transition(seed, SeedState.DORMANT, f"load failed: {reason}", kernel_id)

    def attach(
        self,
        seed: int,
        module: nn.Module,
        *,
        blend: BlendMode = BlendMode.ADD,
        alpha: float = 0.0,
        grad_isolation: bool = False,
    ) -> None:
        """LOADING → ACTIVE with a module the executor has already checked against this host."""
        self.check_index(seed)
        if self._states[seed] is not SeedState.LOADING:
            raise SeedStateError(f"cannot attach: {self._describe(seed)}")
        self.check_alpha(seed, alpha, blend)
        self.seeds[str(seed)] = module
        self._modules_by_seed[seed] = module
        self._seed_calls[seed] = module.forward
        self._blend[seed] = blend
        self._isolate[seed] = grad_isolation
        self._errors[seed] = 0
        self._last_error[seed] = None
        self.layout.error_count[seed] = 0
        self.layout.contribution[seed] = float("nan")
        self._write_alpha(seed, float(alpha))
        self.lifecycle.transition(
            seed, SeedState.ACTIVE, f"kernel loaded, blend={blend.value}", self._kernel_ids[seed]
        )
        self._refresh_running()

    def retire(
        self, seed: int, reason: str, ramp_steps: int = 0, shape: RampShape = "linear"
    ) -> None:
        """ACTIVE → RETIRING; with ramp_steps, α ramps to 0 in advance() before it recycles."""
        self.check_index(seed)
        if self._states[seed] is SeedState.RETIRING and ramp_steps == 0:
            self._recycle(seed, reason)  # finish a retirement that was ramping
            return
        if self._states[seed] is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot retire: {self._describe(seed)}")
        if ramp_steps < 0:
            raise ConfigError(f"ramp_steps must be ≥ 0, got {ramp_steps}")
        # Build the ramp first: a bad shape must raise before the seed has left ACTIVE.
        ramp = (
            AlphaRamp(self._alphas[seed], 0.0, ramp_steps, shape, then_retire=True)
            if ramp_steps
            else None
        )
        self.lifecycle.transition(seed, SeedState.RETIRING, reason, self._kernel_ids[seed])
        self._ramps.pop(seed, None)
        if ramp is None:
            self._recycle(seed, reason)
        else:
            self._ramps[seed] = ramp

    def _recycle(self, seed: int, reason: str) -> None:
        self.recycled += 1
        kernel_id = self._kernel_ids[seed]
        self._write_alpha(seed, 0.0)
        self.lifecycle.transition(seed, SeedState.RECYCLING, reason, kernel_id)
        self._refresh_running()
        self._ramps.pop(seed, None)
        del self.seeds[str(seed)]
        self._modules_by_seed[seed] = None
        self._seed_calls[seed] = None
        self._kernel_ids[seed] = None
        self.lifecycle.transition(seed, SeedState.DORMANT, "slot recycled", kernel_id)

    def _trip(self, seed: int, why: str) -> None:
        log.error("circuit breaker: retiring seed %d of layer %r: %s", seed, self.layer_name, why)
        if self._states[seed] is SeedState.ACTIVE:
            self.lifecycle.transition(
                seed, SeedState.RETIRING, f"circuit breaker: {why}", self._kernel_ids[seed]
            )
        self._recycle(seed, f"circuit breaker: {why}")

    def _refresh_running(self) -> None:
        running = [i for i, s in enumerate(self._states) if s in RUNNING_STATES]
        self._running_lerp = tuple(i for i in running if self._blend[i] is BlendMode.LERP)
        self._running_add = tuple(i for i in running if self._blend[i] is BlendMode.ADD)
        self._route()

    @property
    def dormant_bypass(self) -> bool:
        return self._dormant_bypass

    @dormant_bypass.setter
    def dormant_bypass(self, enabled: bool) -> None:
        self._dormant_bypass = bool(enabled)
        self._route()

    def _route(self) -> None:
        """Point this instance's `forward` at the host's while the bypass applies (see the module
        docstring); otherwise the class's forward, with its blend, runs."""
        if self._dormant_bypass and not (self._running_lerp or self._running_add):
            self.__dict__["forward"] = self.base_layer.forward
        else:
            self.__dict__.pop("forward", None)

    # ------------------------------------------------------------- per step
    def advance(self) -> None:
        """One training step passed: move ramps, age non-dormant seeds, finish retirements."""
        if self.all_dormant:
            return
        self.layout.steps_in_state += (self.layout.state != 0).to(torch.int64)
        for seed, ramp in list(self._ramps.items()):
            self._write_alpha(seed, ramp.advance())
            if ramp.done:
                del self._ramps[seed]
                if ramp.then_retire:
                    self._recycle(seed, "retirement ramp finished")

    def poll_health(self) -> None:
        """Trip the circuit breaker of seeds whose error count reached the threshold (one sync)."""
        running = self.running_seeds()
        if not running:
            return
        counts = self.layout.error_count.tolist()
        for seed in running:
            if counts[seed] >= self.error_threshold:
                why = self._last_error[seed] or "non-finite output"
                self._trip(seed, f"{counts[seed]} errors, last: {why}")

    # ----------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seeds": [
                {
                    "state": self._states[i].name,
                    "kernel_id": self._kernel_ids[i],
                    "blend": self._blend[i].value,
                    "grad_isolation": self._isolate[i],
                    "alpha": self._alphas[i],
                    "ramp": self._ramps[i].to_dict() if i in self._ramps else None,
                }
                for i in range(self.num_seeds)
            ],
        }

    def set_extra_state(self, state: Any) -> None:
        """Rebuild the seeds a checkpoint names; nn.Module then loads their trained parameters,
        because children are loaded after their parent's extra state."""
        seeds = state.get("seeds") if isinstance(state, dict) else None
        if not isinstance(seeds, list) or state.get("version") != 1:
            raise ConfigError(f"layer {self.layer_name!r}: unreadable seed state in checkpoint")
        if len(seeds) != self.num_seeds:
            raise ConfigError(
                f"layer {self.layer_name!r}: checkpoint has {len(seeds)} seeds, "
                f"this layer has {self.num_seeds}"
            )
        for i, saved in enumerate(seeds):
            self._restore_seed(i, saved)

    def _restore_seed(self, i: int, saved: dict[str, Any]) -> None:
        want = SeedState[saved["state"]]
        kernel_id, blend = saved["kernel_id"], BlendMode(saved["blend"])
        # A seed already holding this kernel is kept (its parameters are overwritten next), unless
        # it is retiring and the checkpoint's is not: RETIRING has no edge back to ACTIVE.
        same = (
            self._states[i] in RUNNING_STATES
            and self._kernel_ids[i] == kernel_id
            and self._blend[i] is blend
            and not (self._states[i] is SeedState.RETIRING and want is SeedState.ACTIVE)
        )
        if self._states[i] in RUNNING_STATES and not (same and want in RUNNING_STATES):
            self.retire(i, "restoring checkpoint")  # immediate: RETIRING → RECYCLING → DORMANT
        # ALLOCATED/LOADING/RECYCLING are moments inside an operation: they restore as DORMANT.
        if want not in RUNNING_STATES:
            return
        if not same:
            if self.kernel_loader is None:
                raise SeedStateError(
                    f"layer {self.layer_name!r}: checkpoint holds kernel {kernel_id} in seed {i} "
                    "but this layer has no kernel source; wrap the model with esper.wrap()"
                )
            self.begin_load(i, "restoring checkpoint")
            self.mark_loading(i, kernel_id)
            try:
                module = self.kernel_loader(kernel_id, self)
            except Exception as err:
                self.fail_load(i, str(err))
                raise
            self.attach(i, module, blend=blend, grad_isolation=bool(saved["grad_isolation"]))
        self._write_alpha(i, float(saved["alpha"]))
        self._isolate[i] = bool(saved["grad_isolation"])
        self._ramps.pop(i, None)
        if saved.get("ramp"):
            self._ramps[i] = AlphaRamp.from_dict(saved["ramp"])
        if want is SeedState.RETIRING and self._states[i] is SeedState.ACTIVE:
            self.lifecycle.transition(i, SeedState.RETIRING, "restoring checkpoint", kernel_id)
            self._refresh_running()

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, num_seeds={self.num_seeds}"

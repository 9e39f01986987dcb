"""KasminaLayer: a host layer with N seed slots that kernels are hot-loaded into and blended with.

    y = (1 - Σ_lerp α_i)·host(x) + Σ_lerp α_i·k_i(x) + Σ_add α_j·k_j(x)

Each slot's Python-side state is one SeedSlot record (`_slots`), its numeric state the layer's
StateLayout buffers, created on the host's device and moved with it; SeedSlot's docstring says who
writes what. Which seeds run (`_running_lerp`, `_running_add`) is derived from the records, only
by `_refresh_running()` after a lifecycle transition. α is a buffer updated in place (`fill_`),
which a `torch.compile`d model reads, so it survives α changes without recompiling, as PEFT does
with LoRA scalings; eager forwards take α by value from the records (one fused add per seed).

A *widening* seed (`SeedSlot.widens`) reads this layer's input like any seed, but its output,
shaped like the output of the `downstream` layer (the next one, through an elementwise
activation), is added there: k new hidden units between the two layers. This layer computes it
in its forward and leaves it in `_pending`; the downstream layer, which knows it is fed
(`_fed`), adds it to its own output in the same forward pass and clears it.

With `dormant_bypass` on, a layer none of whose seeds runs has the host's bound `forward` as its
own instance `forward`, so nn.Module.__call__ goes straight to the host: one module call less per
layer per step, ~1.5 % of a tiny MLP's step. Hooks registered on `base_layer` itself then run only
while a seed runs (hooks on the KasminaLayer always run), which is why it is off by default.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from esper.contracts.kernels import HostSignature
from esper.exceptions import (
    AlphaRangeError,
    ConfigError,
    KernelDtypeError,
    KernelShapeError,
    LerpBudgetError,
    SeedStateError,
)
from esper.kasmina.lifecycle import LifecycleManager
from esper.kasmina.schedule import AlphaRamp, RampShape
from esper.kasmina.state import (
    RUNNING_STATES,
    BlendMode,
    SeedSlot,
    SeedState,
    StateLayout,
    check_seed_index,
)

log = logging.getLogger(__name__)

LERP_TOLERANCE = 1e-6
# Given a kernel id and the layer it is for, returns a module ready to attach (checkpoint restore).
KernelLoader = Callable[[str, "KasminaLayer"], nn.Module]
# The SeedSlot fields KasminaLayer writes directly, which _reset_slot returns to a fresh record's;
# the others have writers of their own, which also write a buffer or the module (see SeedSlot).
_PLAIN_FIELDS = tuple(
    f.name for f in fields(SeedSlot) if f.name not in {"state", "alpha", "contribution", "call"}
)


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
    widens: bool = False


class SlotStates:
    """The slots' lifecycle states, as the sequence LifecycleManager (their one writer) reads and
    writes: each state lives in its SeedSlot. The number of slots out of DORMANT is kept with the
    write, so that `KasminaLayer.all_dormant`, asked once per layer per step, is one comparison."""

    def __init__(self, slots: list[SeedSlot]) -> None:
        self._slots = slots
        self.occupied = sum(slot.state is not SeedState.DORMANT for slot in slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, seed: int) -> SeedState:
        return self._slots[seed].state

    def __setitem__(self, seed: int, state: SeedState) -> None:
        slot = self._slots[seed]
        self.occupied += (state is not SeedState.DORMANT) - (slot.state is not SeedState.DORMANT)
        slot.state = state


def _device_of(module: nn.Module) -> torch.device | None:
    """Where the module's tensors live; None (torch's default device) for one without any."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


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
        # On the host's device: a model moved before it is wrapped (as Tolaria does) must not
        # leave its layouts behind on the CPU. `.to()` then moves them with the model.
        self.layout = StateLayout(num_seeds, device=_device_of(base_layer))
        # The one copy of each seed module, keyed by its slot: registered, so state_dict, .to()
        # and parameters() see it.
        self.seeds = nn.ModuleDict()
        self.layer_name = name
        self.num_seeds = num_seeds
        self.guard_nonfinite = guard_nonfinite
        self.error_threshold = error_threshold
        self.kernel_loader: KernelLoader | None = None
        self.recycled = 0  # slots recycled so far; owners compare it to notice retirements cheaply
        # Forward decides from these records, never from device tensors.
        self._slots = [SeedSlot() for _ in range(num_seeds)]
        self._states = SlotStates(self._slots)
        self._running_lerp: tuple[int, ...] = ()
        self._running_add: tuple[int, ...] = ()
        self._running_wide: tuple[int, ...] = ()
        # Widening: the next layer (set by esper.wrap through `connect`), the layer feeding this
        # one, and the output waiting for the downstream layer. Plain references, kept out of
        # nn.Module's registry: the layers are registered where they sit in the model.
        self.next_layer: str | None = None
        self._downstream: KasminaLayer | None = None
        self._upstream: KasminaLayer | None = None
        self._fed = False
        self._pending: torch.Tensor | None = None
        self.lifecycle = LifecycleManager(name, self.layout, self._states)
        self._dormant_bypass = dormant_bypass
        self._route()
        self.register_load_state_dict_post_hook(KasminaLayer._after_load)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._busy:
            return self.base_layer(x)  # dormant fast path: no extra op, no sync
        host = self.base_layer(x)
        if self._running_wide:
            object.__setattr__(self, "_pending", self._widening_output(x))
        out = host if not (self._running_lerp or self._running_add) else self._blend(x, host)
        return self._add_upstream(out) if self._fed else out

    def _blend(self, x: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._blend_from_buffer(x, host)
        # α by value from the slot records: one fused add per seed instead of a clone, an index
        # and a multiply (~2 % of a 512-wide MLP's step). Taken before any seed runs: α may be
        # written before backward does (a ramp, seed_alpha_forced, or the breaker tripping inside
        # this very forward), and this output must be the one computed with the α read here.
        slots, lerp, add = self._slots, self._running_lerp, self._running_add
        lerp_alphas = [slots[i].alpha for i in lerp]
        add_alphas = [slots[i].alpha for i in add]
        out = host
        if lerp:
            out = host * (1.0 - sum(lerp_alphas))
            for i, alpha in zip(lerp, lerp_alphas, strict=True):
                out = torch.add(out, self._seed_output(i, x, host, lerp=True), alpha=alpha)
        for i, alpha in zip(add, add_alphas, strict=True):
            out = torch.add(out, self._seed_output(i, x, host, lerp=False), alpha=alpha)
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

    # ------------------------------------------------------------- widening
    def connect(self, downstream: KasminaLayer, name: str) -> None:
        """Make `downstream` (named `name`) the layer this one's widening seeds add to."""
        if downstream is self or downstream._upstream not in (None, self):
            raise ConfigError(f"layer {name!r} cannot be fed by layer {self.layer_name!r}")
        self.signature.widening(downstream.signature)  # raises unless the shapes chain
        object.__setattr__(self, "_downstream", downstream)
        object.__setattr__(downstream, "_upstream", self)
        self.next_layer = name

    @property
    def downstream(self) -> KasminaLayer | None:
        return self._downstream

    @property
    def widening_signature(self) -> HostSignature | None:
        """The host signature a widening seed of this layer is compiled for; None without a
        downstream layer."""
        if self._downstream is None:
            return None
        return self.signature.widening(self._downstream.signature)

    def _widening_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Σ α·seed(x) over the running widening seeds, for the downstream layer."""
        total: torch.Tensor | None = None
        compiling = torch.compiler.is_compiling()
        for i in self._running_wide:
            k = self._widening_seed_output(i, x)
            if k is None:
                continue
            if compiling:  # α from the buffer, as in _blend_from_buffer
                scaled = self.layout.alpha[i] * k
                total = scaled if total is None else total + scaled
            elif total is None:
                total = k * self._slots[i].alpha
            else:
                total = torch.add(total, k, alpha=self._slots[i].alpha)
        return total

    def _widening_seed_output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        slot = self._slots[i]
        assert slot.call is not None
        seed_in = x.detach() if slot.grad_isolation else x
        try:
            if self.signature.kind == "linear" and seed_in.dim() != 2:
                k = slot.call(seed_in.reshape(-1, self.signature.in_features))
                k = k.reshape(*seed_in.shape[:-1], k.shape[-1])
            elif self._unbatched(seed_in):
                k = slot.call(seed_in.unsqueeze(0)).squeeze(0)
            else:
                k = slot.call(seed_in)
            if k.dtype != x.dtype:
                raise KernelDtypeError(f"output dtype {k.dtype} != input {x.dtype}")
        except Exception as err:
            self._record_exception(i, err)
            return None
        return self._finite(i, k, 0.0)

    def _add_upstream(self, out: torch.Tensor) -> torch.Tensor:
        """Add what the upstream layer's widening seeds left for this layer (once)."""
        upstream = self._upstream
        assert upstream is not None
        pending = upstream._pending
        if pending is None:
            return out
        object.__setattr__(upstream, "_pending", None)
        if pending.shape != out.shape:
            for i in upstream._running_wide:
                upstream._record_error(
                    i,
                    f"output shape {tuple(pending.shape)} != {self.layer_name!r}'s "
                    f"{tuple(out.shape)}",
                )
            return out
        return out + pending

    def _set_fed(self, fed: bool) -> None:
        self._fed = fed
        self._route()

    def _unbatched(self, x: torch.Tensor) -> bool:
        kind = self.signature.kind
        return (kind == "conv2d" and x.dim() == 3) or (kind == "conv1d" and x.dim() == 2)

    def _seed_output(self, i: int, x: torch.Tensor, host: torch.Tensor, lerp: bool) -> torch.Tensor:
        slot = self._slots[i]
        module = slot.call
        assert module is not None
        seed_in = x.detach() if slot.grad_isolation else x
        try:
            if self.signature.kind == "linear" and seed_in.dim() != 2:
                # Kernels are exported for [batch, features]; fold any leading dims into batch.
                k = module(seed_in.reshape(-1, self.signature.in_features)).reshape(host.shape)
            elif self._unbatched(seed_in):
                # An unbatched [C, H, W] or [C, L] input, which nn.Conv2d and nn.Conv1d accept:
                # kernels expect a batch.
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
        checked = self._finite(i, k, host if lerp else 0.0)
        if checked is None:
            return host if lerp else torch.zeros_like(host)
        return checked

    def _finite(
        self, i: int, k: torch.Tensor, fallback: torch.Tensor | float
    ) -> torch.Tensor | None:
        """`k` when it is finite (or the guard is off); None when it is not, read on the CPU and
        counted; on an accelerator, `k` or `fallback` selected on the device and counted there.

        One reduction tells whether any element is NaN/inf. On the CPU reading it costs nothing,
        so the check branches in Python and a healthy seed pays no elementwise pass. On an
        accelerator (or inside torch.compile) reading it would sync: the fallback is selected on
        the device instead and the count is read later by poll_health()."""
        if not self.guard_nonfinite:
            return k
        finite = torch.isfinite(k.sum(dtype=torch.float32))
        if k.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(finite):
                return k
            self._record_error(i, "non-finite output")
            return None
        self.layout.error_count[i] += ~finite
        return torch.where(finite, k, fallback)

    def _record_exception(self, i: int, err: Exception) -> None:
        self._record_error(i, f"{type(err).__name__}: {err}")

    def _record_error(self, i: int, message: str) -> None:
        """Count an error seen in Python (an exception, or a non-finite output read on the CPU);
        at the threshold the circuit breaker retires the seed at once.

        The count is the layout's, which also holds the errors counted on the device: reading it
        back costs nothing on the CPU and one sync elsewhere, paid only on this error path, at
        most `error_threshold` times per seed."""
        slot = self._slots[i]
        slot.last_error = message
        self.layout.error_count[i] += 1
        log.warning(
            "seed %d of layer %r fell back to the host output (%s)", i, self.layer_name, message
        )
        if slot.state in RUNNING_STATES:
            errors = int(self.layout.error_count[i])
            if errors >= self.error_threshold:
                self._trip(i, f"{errors} errors, last: {message}")

    # ----------------------------------------------------------- introspection
    def check_index(self, seed: int) -> None:
        check_seed_index(self.layer_name, seed, self.num_seeds)

    def seed_info(self, seed: int) -> SeedInfo:
        self.check_index(seed)
        slot = self._slots[seed]
        return SeedInfo(
            self.layer_name,
            seed,
            slot.state,
            slot.alpha,
            slot.kernel_id,
            slot.blend,
            slot.grad_isolation,
            slot.last_error,
            slot.widens,
        )

    def seed_module(self, seed: int) -> nn.Module | None:
        self.check_index(seed)
        key = str(seed)
        return self.seeds[key] if key in self.seeds else None  # noqa: SIM401 (ModuleDict: no get)

    def free_seeds(self) -> list[int]:
        return [i for i, slot in enumerate(self._slots) if slot.state is SeedState.DORMANT]

    @property
    def all_dormant(self) -> bool:
        """Every slot empty: a step has nothing to advance (one comparison, see SlotStates, so
        this check is cheap enough to make once per layer per training step)."""
        return self._states.occupied == 0

    def running_seeds(self) -> tuple[int, ...]:
        return tuple(i for i, slot in enumerate(self._slots) if slot.state in RUNNING_STATES)

    def contribution(self, seed: int) -> float:
        """The seed's last measured contribution, as recorded; NaN while there is none."""
        self.check_index(seed)
        return self._slots[seed].contribution

    def record_contribution(self, seed: int, value: float) -> None:
        """Record a measured contribution (NaN: none), kept until the next one or until the slot
        is emptied; checkpoints carry it."""
        self.check_index(seed)
        self._write_contribution(seed, float(value))

    def _write_contribution(self, seed: int, value: float) -> None:
        self._slots[seed].contribution = value
        self.layout.contribution[seed] = value

    def _describe(self, seed: int) -> str:
        slot = self._slots[seed]
        kid = slot.kernel_id
        return f"seed {seed} of layer {self.layer_name!r} is {slot.state.name}" + (
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
        if (blend or self._slots[seed].blend) is BlendMode.LERP:
            others = sum(
                max(slot.alpha, slot.ramp.target if slot.ramp is not None else 0.0)
                for j, slot in enumerate(self._slots)
                if j != seed and slot.state in RUNNING_STATES and slot.blend is BlendMode.LERP
            )
            if others + alpha > 1 + LERP_TOLERANCE:
                raise LerpBudgetError(
                    f"Σ α of lerp seeds in layer {self.layer_name!r} would be {others + alpha:.4f} "
                    f"> 1 (seed {seed} asks α={alpha}, the other lerp seeds hold {others:.4f})"
                )

    def set_alpha(self, seed: int, alpha: float) -> None:
        self.check_index(seed)
        slot = self._slots[seed]
        if slot.state is SeedState.RETIRING:
            # Writing α would cancel the retirement ramp and leave the seed RETIRING for good.
            raise SeedStateError(f"cannot set α: {self._describe(seed)}")
        if slot.state is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot set α: {self._describe(seed)}; load a kernel first")
        self.check_alpha(seed, alpha)
        slot.ramp = None
        self._write_alpha(seed, float(alpha))

    def _write_alpha(self, seed: int, alpha: float) -> None:
        self._slots[seed].alpha = alpha
        self.layout.alpha[seed].fill_(alpha)  # in place: compiled graphs keep reading the buffer

    @contextlib.contextmanager
    def alpha_forced(self, seed: int, alpha: float) -> Iterator[None]:
        """Run as if the seed's α were `alpha`, then put its α back (no checks of state or lerp
        budget: a counterfactual evaluation, see MorphableModel.seed_alpha_forced)."""
        self.check_index(seed)
        saved = self._slots[seed].alpha
        self._write_alpha(seed, float(alpha))
        try:
            yield
        finally:
            self._write_alpha(seed, saved)

    def start_ramp(self, seed: int, target: float, steps: int, shape: RampShape = "linear") -> None:
        self.check_index(seed)
        slot = self._slots[seed]
        if slot.state is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot ramp α: {self._describe(seed)}")
        self.check_alpha(seed, target)
        slot.ramp = AlphaRamp(slot.alpha, float(target), steps, shape)

    # -------------------------------------------------------------- lifecycle
    def begin_load(self, seed: int, reason: str) -> None:
        """DORMANT → ALLOCATED. The caller then fetches the kernel and calls mark_loading/attach."""
        self.check_index(seed)
        if self._slots[seed].state is not SeedState.DORMANT:
            raise SeedStateError(f"cannot load: {self._describe(seed)}; retire it first")
        self.lifecycle.transition(seed, SeedState.ALLOCATED, reason)

    def mark_loading(self, seed: int, kernel_id: str) -> None:
        self.check_index(seed)
        reason = f"fetching kernel {kernel_id}"
        self.lifecycle.transition(seed, SeedState.LOADING, reason, kernel_id)
        self._slots[seed].kernel_id = kernel_id

    def fail_load(self, seed: int, reason: str) -> None:
        self.check_index(seed)
        self.lifecycle.check(seed, SeedState.DORMANT)  # before any write: ACTIVE → DORMANT raises
        slot = self._slots[seed]
        kernel_id = slot.kernel_id
        slot.kernel_id = None
        self.lifecycle.transition(seed, SeedState.DORMANT, f"load failed: {reason}", kernel_id)

    def attach(
        self,
        seed: int,
        module: nn.Module,
        *,
        blend: BlendMode = BlendMode.ADD,
        alpha: float = 0.0,
        grad_isolation: bool = False,
        widens: bool = False,
    ) -> None:
        """LOADING → ACTIVE with a module the executor has already checked against this host
        (for a widening seed, `widens`: against this layer and its downstream layer)."""
        self.check_index(seed)
        slot = self._slots[seed]
        if slot.state is not SeedState.LOADING:
            raise SeedStateError(f"cannot attach: {self._describe(seed)}")
        if widens and self._downstream is None:
            raise ConfigError(
                f"layer {self.layer_name!r} has no downstream layer for a widening seed: only a "
                "layer followed by another of its kind, through an activation, can be widened"
            )
        if widens and blend is not BlendMode.ADD:
            raise ConfigError("a widening seed adds to the next layer's output: its blend is 'add'")
        self.check_alpha(seed, alpha, blend)
        kernel_id = slot.kernel_id  # named by mark_loading; nothing else of the slot carries over
        self._reset_slot(seed)
        slot.kernel_id = kernel_id
        slot.blend = blend
        slot.grad_isolation = grad_isolation
        slot.widens = widens
        self._seat(seed, module)
        self._write_alpha(seed, float(alpha))
        self.lifecycle.transition(
            seed, SeedState.ACTIVE, f"kernel loaded, blend={blend.value}", kernel_id
        )
        self._refresh_running()

    def retire(
        self, seed: int, reason: str, ramp_steps: int = 0, shape: RampShape = "linear"
    ) -> None:
        """ACTIVE → RETIRING; with ramp_steps, α ramps to 0 in advance() before it recycles."""
        self.check_index(seed)
        slot = self._slots[seed]
        if slot.state is SeedState.RETIRING and ramp_steps == 0:
            self._recycle(seed, reason)  # finish a retirement that was ramping
            return
        if slot.state is not SeedState.ACTIVE:
            raise SeedStateError(f"cannot retire: {self._describe(seed)}")
        if ramp_steps < 0:
            raise ConfigError(f"ramp_steps must be ≥ 0, got {ramp_steps}")
        # Build the ramp first: a bad shape must raise before the seed has left ACTIVE.
        ramp = (
            AlphaRamp(slot.alpha, 0.0, ramp_steps, shape, then_retire=True) if ramp_steps else None
        )
        self.lifecycle.transition(seed, SeedState.RETIRING, reason, slot.kernel_id)
        slot.ramp = ramp
        if ramp is None:
            self._recycle(seed, reason)

    def _recycle(self, seed: int, reason: str) -> None:
        self.recycled += 1
        kernel_id = self._slots[seed].kernel_id
        self._write_alpha(seed, 0.0)
        self.lifecycle.transition(seed, SeedState.RECYCLING, reason, kernel_id)
        self._refresh_running()
        self._reset_slot(seed)
        self.lifecycle.transition(seed, SeedState.DORMANT, "slot recycled", kernel_id)

    def _reset_slot(self, seed: int) -> None:
        """Return a slot to a fresh one, all but its lifecycle state (LifecycleManager's to
        write): no module, α 0, no contribution, no errors, no ramp, default blend and isolation,
        no kernel id. The one reset: attach and recycle use it, and so does a checkpoint restore,
        which goes through them. Nothing of an earlier seed outlives it."""
        self._seat(seed, None)
        self._write_alpha(seed, 0.0)
        self._write_contribution(seed, math.nan)
        self.layout.error_count[seed] = 0
        slot, fresh = self._slots[seed], SeedSlot()
        for name in _PLAIN_FIELDS:
            setattr(slot, name, getattr(fresh, name))

    def _seat(self, seed: int, module: nn.Module | None) -> None:
        """Put `module` (None: none) in the slot: the module kept once, in `seeds`, and the call
        path forward takes derived from it here alone (see SeedSlot.call)."""
        key = str(seed)
        if key in self.seeds:
            del self.seeds[key]
        if module is None:
            self._slots[seed].call = None
        else:
            self.seeds[key] = module
            self._slots[seed].call = module.forward

    def _trip(self, seed: int, why: str) -> None:
        log.error("circuit breaker: retiring seed %d of layer %r: %s", seed, self.layer_name, why)
        slot = self._slots[seed]
        if slot.state is SeedState.ACTIVE:
            self.lifecycle.transition(
                seed, SeedState.RETIRING, f"circuit breaker: {why}", slot.kernel_id
            )
        self._recycle(seed, f"circuit breaker: {why}")

    def _refresh_running(self) -> None:
        slots = self._slots
        running = [i for i, slot in enumerate(slots) if slot.state in RUNNING_STATES]
        wide = tuple(i for i in running if slots[i].widens)
        self._running_lerp = tuple(i for i in running if slots[i].blend is BlendMode.LERP)
        self._running_add = tuple(
            i for i in running if slots[i].blend is BlendMode.ADD and not slots[i].widens
        )
        self._running_wide = wide
        if not wide:
            object.__setattr__(self, "_pending", None)
        if self._downstream is not None:
            self._downstream._set_fed(bool(wide))
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
        # Derived here, where every change of the running sets or of `_fed` passes, so that
        # forward tests one flag per call instead of four.
        self._busy = bool(
            self._running_lerp or self._running_add or self._running_wide or self._fed
        )
        if self._dormant_bypass and not self._busy:
            self.__dict__["forward"] = self.base_layer.forward
        else:
            self.__dict__.pop("forward", None)

    # ------------------------------------------------------------- per step
    def advance(self) -> None:
        """One training step passed: move ramps, age non-dormant seeds, finish retirements."""
        if self.all_dormant:
            return
        self.layout.steps_in_state += (self.layout.state != 0).to(torch.int64)
        for seed, slot in enumerate(self._slots):
            ramp = slot.ramp
            if ramp is None:
                continue
            self._write_alpha(seed, ramp.advance())
            if ramp.done:
                slot.ramp = None
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
                why = self._slots[seed].last_error or "non-finite output"
                self._trip(seed, f"{counts[seed]} errors, last: {why}")

    # ----------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        # α and the contribution as the records hold them: the float32 buffers would round them.
        return {
            "version": 1,
            "seeds": [
                {
                    "state": slot.state.name,
                    "kernel_id": slot.kernel_id,
                    "blend": slot.blend.value,
                    "grad_isolation": slot.grad_isolation,
                    "widens": slot.widens,
                    "alpha": slot.alpha,
                    "ramp": slot.ramp.to_dict() if slot.ramp is not None else None,
                    "contribution": slot.contribution,
                }
                for slot in self._slots
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
        slot = self._slots[i]
        widens = bool(saved.get("widens", False))  # absent from checkpoints before widening
        same = (
            slot.state in RUNNING_STATES
            and slot.kernel_id == kernel_id
            and slot.blend is blend
            and slot.widens == widens
            and not (slot.state is SeedState.RETIRING and want is SeedState.ACTIVE)
        )
        if slot.state in RUNNING_STATES and not (same and want in RUNNING_STATES):
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
            self.attach(
                i,
                module,
                blend=blend,
                grad_isolation=bool(saved["grad_isolation"]),
                widens=widens,
            )
        self._write_alpha(i, float(saved["alpha"]))
        slot.grad_isolation = bool(saved["grad_isolation"])
        slot.ramp = AlphaRamp.from_dict(saved["ramp"]) if saved.get("ramp") else None
        if "contribution" in saved:  # absent from earlier checkpoints: see _after_load
            self._write_contribution(i, float(saved["contribution"]))
        if want is SeedState.RETIRING and slot.state is SeedState.ACTIVE:
            self.lifecycle.transition(i, SeedState.RETIRING, "restoring checkpoint", kernel_id)
            self._refresh_running()

    @staticmethod
    def _after_load(module: nn.Module, _incompatible_keys: Any) -> None:
        """After a load the layout's contribution buffer holds the stored value. A record it does
        not match (a checkpoint written before the extra state carried the exact value) takes
        the buffer's; one that rounds to it keeps its exact value. One read of the buffer per
        layer (a sync off the CPU), at load time only."""
        assert isinstance(module, KasminaLayer)
        buffer = module.layout.contribution
        if buffer.is_meta:
            return  # nothing was loaded into it, and there is nothing to read
        stored = buffer.tolist()
        exact = [slot.contribution for slot in module._slots]
        rounded = torch.tensor(exact, dtype=buffer.dtype).tolist()
        for i, (have, want) in enumerate(zip(rounded, stored, strict=True)):
            if have != want and not (math.isnan(have) and math.isnan(want)):
                module._write_contribution(i, want)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, num_seeds={self.num_seeds}"

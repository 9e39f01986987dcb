"""esper.wrap and MorphableModel: seed slots in the Linear and Conv2d layers of any model."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from esper._sync import run_sync
from esper.exceptions import (
    AlphaRangeError,
    ConfigError,
    UnknownLayerError,
    UnsupportedHostError,
)
from esper.kasmina.layer import KasminaLayer, SeedInfo
from esper.kasmina.lifecycle import Listener
from esper.kasmina.schedule import RampShape
from esper.kasmina.state import BlendMode
from esper.kernels.cache import KernelCache
from esper.kernels.executor import KernelExecutor
from esper.registry import default_registry

HOST_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d)


class MorphableModel(nn.Module):
    """A model whose chosen layers are KasminaLayers, keyed by their dotted `named_modules()` names.

    Every seed change goes through here (or the layer's own methods) and is reported to the
    listeners; `step()` after each optimizer step moves α ramps and trips circuit breakers.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, KasminaLayer],
        kernels: KernelCache,
        executor: KernelExecutor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.kernels = kernels
        self.executor = executor or KernelExecutor()
        self._layers = layers  # a plain dict: the layers are registered inside `model`
        self._optimizers: list[tuple[torch.optim.Optimizer, dict[str, Any]]] = []
        self._recycled_seen = 0
        for layer in layers.values():
            layer.kernel_loader = self._load_for_restore
        self.register_load_state_dict_post_hook(MorphableModel._after_load)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> MorphableModel:
        """A copy with its own layers and seeds (an EMA model, a best-so-far snapshot). The kernel
        cache and executor are services and are shared (the cache holds locks, which cannot be
        copied); the copy is attached to no optimizer."""
        memo[id(self.kernels)] = self.kernels
        memo[id(self.executor)] = self.executor
        memo[id(self._optimizers)] = []
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    # ------------------------------------------------------------- layers
    def layer(self, name: str) -> KasminaLayer:
        try:
            return self._layers[name]
        except KeyError:
            raise UnknownLayerError(name, list(self._layers)) from None

    @property
    def layers(self) -> dict[str, KasminaLayer]:
        return dict(self._layers)

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def seeds(self, layer: str | None = None) -> list[SeedInfo]:
        names = [layer] if layer is not None else list(self._layers)
        return [self.layer(n).seed_info(i) for n in names for i in range(self.layer(n).num_seeds)]

    def add_listener(self, listener: Listener) -> None:
        for layer in self._layers.values():
            layer.lifecycle.listeners.append(listener)

    # -------------------------------------------------------------- seeds
    async def load_kernel(
        self,
        layer: str,
        seed_idx: int,
        kernel_id: str,
        *,
        blend: BlendMode | str | None = None,
        alpha: float = 0.0,
        grad_isolation: bool = False,
    ) -> SeedInfo:
        """Fetch a kernel (an id or a tag) through the cache and make it ACTIVE in a seed slot.

        The slot goes DORMANT → ALLOCATED → LOADING → ACTIVE; on any failure it returns to DORMANT
        (an event says why) and the error is raised.
        """
        kl = self.layer(layer)
        kl.check_index(seed_idx)
        mode = None if blend is None else _blend(blend)
        kl.check_alpha(seed_idx, alpha, mode or BlendMode.ADD)
        kl.begin_load(seed_idx, f"load {kernel_id}")
        try:
            resolved = await self.kernels.resolve(kernel_id)
            kl.mark_loading(seed_idx, resolved)
            cached = await self.kernels.get(resolved)
            widens = cached.meta.host.downstream is not None
            module = self._prepare(cached.template, kl, resolved, widens)
            mode = mode or BlendMode(cached.meta.default_blend)
            kl.attach(
                seed_idx,
                module,
                blend=mode,
                alpha=alpha,
                grad_isolation=grad_isolation,
                widens=widens,
            )
        except BaseException as err:
            kl.fail_load(seed_idx, f"{type(err).__name__}: {err}")
            raise
        self._join_optimizers(layer, seed_idx)
        return kl.seed_info(seed_idx)

    def load_kernel_sync(self, layer: str, seed_idx: int, kernel_id: str, **kw: Any) -> SeedInfo:
        return run_sync(self.load_kernel(layer, seed_idx, kernel_id, **kw))

    def set_seed_alpha(self, layer: str, seed_idx: int, alpha: float) -> None:
        self.layer(layer).set_alpha(seed_idx, alpha)

    def ramp_seed_alpha(
        self, layer: str, seed_idx: int, target: float, steps: int, shape: RampShape = "linear"
    ) -> None:
        """Move α from its current value to `target` over `steps` calls of `step()`."""
        self.layer(layer).start_ramp(seed_idx, target, steps, shape)

    def retire_seed(
        self,
        layer: str,
        seed_idx: int,
        *,
        ramp_steps: int = 0,
        reason: str = "retired by caller",
        shape: RampShape = "linear",
    ) -> None:
        """ACTIVE → RETIRING; at once, or after α ramps down to 0 over `ramp_steps` steps."""
        self.layer(layer).retire(seed_idx, reason, ramp_steps, shape)
        self._leave_optimizers()

    def unload_seed(self, layer: str, seed_idx: int, reason: str = "unloaded by caller") -> None:
        self.retire_seed(layer, seed_idx, reason=reason)

    @property
    def all_dormant(self) -> bool:
        """No seed of any layer is out of DORMANT: `step()` and `clip_seed_gradients()` have
        nothing to do, and a training loop may skip them until a seed is loaded."""
        return all(layer.all_dormant for layer in self._layers.values())

    def step(self) -> None:
        """Call once per optimizer step: advances α ramps, ages seeds, polls circuit breakers."""
        recycled = 0
        for layer in self._layers.values():
            if not layer.all_dormant:
                layer.advance()
                layer.poll_health()
            recycled += layer.recycled
        # Seeds retired since the last look (a ramp ending here, the breaker in a forward) leave
        # the optimizers; most steps retire nothing and skip the scan of every seed's params.
        if recycled != self._recycled_seen:
            self._recycled_seen = recycled
            self._leave_optimizers()

    def record_contribution(self, layer: str, seed_idx: int, value: float) -> None:
        """Record a seed's measured contribution in its layer (the one place it is kept)."""
        self.layer(layer).record_contribution(seed_idx, value)

    def contribution(self, layer: str, seed_idx: int) -> float:
        """The seed's last recorded contribution; NaN while it has none."""
        return self.layer(layer).contribution(seed_idx)

    @contextlib.contextmanager
    def seed_alpha_forced(self, layer: str, seed_idx: int, alpha: float = 0.0) -> Iterator[None]:
        """Evaluate as if the seed's α were `alpha` (the counterfactual of a contribution)."""
        kl = self.layer(layer)
        kl.check_index(seed_idx)
        if isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:  # NaN fails both comparisons
            raise AlphaRangeError(
                f"forced α={alpha!r} for seed {seed_idx} of layer {layer!r} is outside [0, 1]"
            )
        with kl.alpha_forced(seed_idx, alpha):
            yield

    def measure_contribution(
        self, layer: str, seed_idx: int, evaluate: Callable[[], float]
    ) -> float:
        """`evaluate()` with the seed minus with its α forced to 0 (higher metric = better)."""
        with torch.no_grad():
            with_seed = evaluate()
            with self.seed_alpha_forced(layer, seed_idx, 0.0):
                without = evaluate()
        contribution = float(with_seed) - float(without)
        if math.isfinite(contribution):
            self.record_contribution(layer, seed_idx, contribution)
        return contribution

    # --------------------------------------------------------- parameters
    def seed_parameters(
        self, layer: str | None = None, seed_idx: int | None = None
    ) -> list[nn.Parameter]:
        names = [layer] if layer is not None else list(self._layers)
        params: list[nn.Parameter] = []
        for name in names:
            kl = self.layer(name)
            seeds = [seed_idx] if seed_idx is not None else range(kl.num_seeds)
            for i in seeds:
                module = kl.seed_module(i)
                if module is not None:
                    params.extend(module.parameters())
        return params

    def host_parameters(self) -> list[nn.Parameter]:
        seed_ids = {id(p) for p in self.seed_parameters()}
        return [p for p in self.parameters() if id(p) not in seed_ids]

    def attach_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float | None = None,
        max_grad_norm: float | None = None,
        **group_options: Any,
    ) -> None:
        """From now on every loaded seed joins `optimizer` in its own param group (own lr and
        clipping, see clip_seed_gradients) and leaves it when retired. Seeds already loaded
        join now."""
        options = {"lr": lr, "max_grad_norm": max_grad_norm, **group_options}
        self._optimizers.append((optimizer, options))
        for name, kl in self._layers.items():
            for i in kl.running_seeds():
                self._join(optimizer, options, name, i)

    def _join_optimizers(self, layer: str, seed_idx: int) -> None:
        for optimizer, options in self._optimizers:
            self._join(optimizer, options, layer, seed_idx)

    def _join(
        self, optimizer: torch.optim.Optimizer, options: dict[str, Any], layer: str, i: int
    ) -> None:
        group_name = f"seed:{layer}:{i}"
        params = self.seed_parameters(layer, i)
        for group in optimizer.param_groups:
            if group.get("name") == group_name:
                if [id(p) for p in group["params"]] == [id(p) for p in params]:
                    return  # already in
                # A stale group of an earlier seed in this slot (one the circuit breaker retired
                # in forward, before step() could remove it): the new seed gets a fresh group.
                _drop_group(optimizer, group)
                break
        group = {k: v for k, v in options.items() if v is not None and k != "max_grad_norm"}
        group.update(params=params, name=group_name, max_grad_norm=options.get("max_grad_norm"))
        optimizer.add_param_group(group)

    def _leave_optimizers(self) -> None:
        if not self._optimizers:
            return
        live = {id(p) for p in self.seed_parameters()}
        for optimizer, _ in self._optimizers:
            for group in list(optimizer.param_groups):
                name = str(group.get("name", ""))
                if name.startswith("seed:") and not any(id(p) in live for p in group["params"]):
                    _drop_group(optimizer, group)

    def clip_seed_gradients(self) -> None:
        """Clip each seed group by its own max_grad_norm, so one diverging seed cannot scale the
        host's gradients through a global norm."""
        for optimizer, _ in self._optimizers:
            for group in optimizer.param_groups:
                if str(group.get("name", "")).startswith("seed:") and group.get("max_grad_norm"):
                    nn.utils.clip_grad_norm_(group["params"], group["max_grad_norm"])

    # -------------------------------------------------------- checkpoints
    def _load_for_restore(self, kernel_id: str, kl: KasminaLayer) -> nn.Module:
        cached = self.kernels.get_sync(kernel_id)
        widens = cached.meta.host.downstream is not None
        return self._prepare(cached.template, kl, kernel_id, widens)

    def _prepare(
        self, template: nn.Module, kl: KasminaLayer, kernel_id: str, widens: bool
    ) -> nn.Module:
        """The executor's checked copy of a kernel for `kl`; a widening kernel is checked against
        the layer and its downstream layer together."""
        if not widens:
            return self.executor.prepare(template, kl.base_layer, kernel_id, kl.layer_name)
        if kl.downstream is None:
            raise UnsupportedHostError(
                f"kernel {kernel_id} widens a layer into the next one, but layer "
                f"{kl.layer_name!r} has no next layer it feeds through an activation"
            )
        return self.executor.prepare(
            template,
            kl.base_layer,
            kernel_id,
            kl.layer_name,
            downstream_layer=kl.downstream.base_layer,
        )

    # A checkpoint restores seeds through each KasminaLayer's extra state: the layer re-resolves
    # its kernels by id through this model's cache, then nn.Module loads the trained seed
    # parameters over them. These hooks (rather than a load_state_dict override) also run when
    # the MorphableModel sits inside another module that is the one being loaded.
    @staticmethod
    def _after_load(module: nn.Module, _incompatible_keys: Any) -> None:
        """Seeds the checkpoint replaced leave the attached optimizers; restored seeds join."""
        assert isinstance(module, MorphableModel)
        module._leave_optimizers()
        for name, layer in module._layers.items():
            for i in layer.running_seeds():
                module._join_optimizers(name, i)


# Elementwise: a widening seed's hidden units between two layers see the same function as the
# layer's own units, so only these may stand between a layer and the next one it widens into.
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
    nn.Identity,
)


def _widenable_pairs(model: nn.Module, wrapped: dict[str, KasminaLayer]) -> list[tuple[str, str]]:
    """(layer, next layer) for each wrapped layer that an nn.Sequential follows, through
    elementwise activations only, by another wrapped layer of its kind whose input is its output:
    where k hidden units can be added between the two (a widening seed)."""
    by_module = {id(layer): name for name, layer in wrapped.items()}
    pairs = []
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for i, child in enumerate(children):
            if id(child) not in by_module:
                continue
            rest = children[i + 1 :]
            following = next((m for m in rest if not isinstance(m, ELEMENTWISE)), None)
            if following is None or id(following) not in by_module:
                continue
            first, second = by_module[id(child)], by_module[id(following)]
            a, b = wrapped[first].signature, wrapped[second].signature
            if a.kind == b.kind and a.out_features == b.in_features:
                pairs.append((first, second))
    return pairs


def _drop_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """Remove a param group and its parameters' state. By identity: `list.remove` would compare
    the groups' tensors with `==`."""
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not group]
    for p in group["params"]:
        optimizer.state.pop(p, None)


def _blend(value: BlendMode | str) -> BlendMode:
    try:
        return BlendMode(value)
    except ValueError:
        raise ConfigError(f"blend mode {value!r} is not 'add' or 'lerp'") from None


# Modules that hand their Linear children's weights to a functional kernel instead of calling
# them (nn.MultiheadAttention passes out_proj.weight/.bias to F.multi_head_attention_forward): a
# KasminaLayer there has no `.weight`, and its seeds would never run.
WEIGHT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _weight_reader(model: nn.Module, name: str) -> nn.Module | None:
    """The parent of layer `name` when it reads the layer's weights rather than calling it."""
    parent = model.get_submodule(name.rpartition(".")[0])
    return parent if isinstance(parent, WEIGHT_READERS) else None


def _check_called_as_module(model: nn.Module, name: str) -> None:
    parent = _weight_reader(model, name)
    if parent is not None:
        raise UnsupportedHostError(
            f"layer {name!r} is never called as a module: its parent, an "
            f"nn.{type(parent).__name__}, passes its weight and bias to a functional kernel, so a "
            "Kasmina layer there would have no weight to give and its seeds would never run"
        )


def _module_call_marker(_module: nn.Module, _args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence is what `_keep_module_calls` needs."""
    return None


def _keep_module_calls(model: nn.Module) -> None:
    """Keep torch's fused transformer paths away from wrapped layers, which they would skip.

    In eval mode without grad, nn.TransformerEncoderLayer.forward hands linear1/linear2's weights
    to torch._transformer_encoder_layer_fwd instead of calling them (seeds bypassed; a
    KasminaLayer has no `.weight` anyway). It keeps its module path whenever any module inside it
    has a forward hook, so each KasminaLayer inside one gets a no-op pre-hook. nn.TransformerEncoder
    reads its first layer's weights to decide whether to pack a padded batch into a nested tensor;
    its `use_nested_tensor` turns that off. Encoder layers holding no wrapped layer keep both.
    """
    for module in model.modules():
        if not isinstance(module, nn.TransformerEncoderLayer | nn.TransformerEncoder):
            continue
        inside = [m for m in module.modules() if isinstance(m, KasminaLayer)]
        if not inside:
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            for layer in inside:
                if _module_call_marker not in layer._forward_pre_hooks.values():
                    layer.register_forward_pre_hook(_module_call_marker)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def wrap(
    model: nn.Module,
    seeds_per_layer: int = 4,
    *,
    layers: Iterable[str] | None = None,
    kernels: KernelCache | None = None,
    guard_nonfinite: bool = True,
    error_threshold: int = 3,
    dormant_bypass: bool = False,
) -> MorphableModel:
    """Replace the model's nn.Linear and nn.Conv2d layers (or the named `layers`) in place by
    KasminaLayers with `seeds_per_layer` seed slots each, and return the MorphableModel.

    Layers whose parent reads their weights instead of calling them (the `out_proj` of an
    nn.MultiheadAttention, see WEIGHT_READERS) are left out; naming one raises
    UnsupportedHostError. Transformer encoder layers holding a wrapped layer take their module
    path in eval mode too, so that seeds run (see `_keep_module_calls`).

    Kernels are resolved through `kernels`, by default a cache over `esper.default_registry()`.
    `dormant_bypass` lets a layer without running seeds call its host's forward directly (faster
    on tiny models; hooks on a layer's `base_layer` then run only while a seed runs).
    """
    if isinstance(model, MorphableModel):
        raise ConfigError("the model is already wrapped")
    modules = dict(model.named_modules())
    already = [n or "(the model itself)" for n, m in modules.items() if isinstance(m, KasminaLayer)]
    if already:
        # Wrapping again would nest a KasminaLayer around each wrapped layer's base_layer.
        raise ConfigError(f"the model is already wrapped (Kasmina layers: {', '.join(already)})")
    if layers is None:
        names = [
            n
            for n, m in modules.items()
            if isinstance(m, HOST_TYPES) and n and _weight_reader(model, n) is None
        ]
    else:
        names = list(layers)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"layers named more than once: {', '.join(repeated)}")
        hosts = [n for n, m in modules.items() if isinstance(m, HOST_TYPES)]
        for name in names:
            if name not in modules or not name:
                raise UnknownLayerError(name, hosts)
            if not isinstance(modules[name], HOST_TYPES):
                raise UnsupportedHostError(
                    f"layer {name!r} is a {type(modules[name]).__name__}; "
                    "Kasmina wraps nn.Linear and nn.Conv2d"
                )
            _check_called_as_module(model, name)
    if isinstance(model, HOST_TYPES):
        raise ConfigError(
            f"the model is itself an nn.{type(model).__name__}; wrap a module that contains it, "
            "such as nn.Sequential(layer)"
        )
    if not names:
        if layers is not None:
            raise ConfigError("layers=[] selects no layer to wrap")
        raise ConfigError("the model has no nn.Linear or nn.Conv2d layer to wrap")
    wrapped: dict[str, KasminaLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = KasminaLayer(
            modules[name],
            seeds_per_layer,
            name=name,
            guard_nonfinite=guard_nonfinite,
            error_threshold=error_threshold,
            dormant_bypass=dormant_bypass,
        )
        setattr(parent, child, layer)
        wrapped[name] = layer
    for upstream, downstream in _widenable_pairs(model, wrapped):
        wrapped[upstream].connect(wrapped[downstream], downstream)
    _keep_module_calls(model)
    cache = kernels if kernels is not None else KernelCache([default_registry()])
    return MorphableModel(model, wrapped, cache)

"""esper.wrap and MorphableModel: naming, seeds, real training with seeds, optimizer groups."""

from __future__ import annotations

import asyncio
import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
import esper.registry
from esper.exceptions import (
    ConfigError,
    KernelShapeError,
    SeedStateError,
    UnknownKernelError,
    UnknownLayerError,
    UnsupportedHostError,
)
from esper.kasmina import LifecycleEvent, SeedState

REPO_ROOT = Path(__file__).resolve().parents[3]
S = SeedState


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class NestedNet(nn.Module):
    """Modules inside Sequentials inside modules: names like `features.3` and `layer1.0.conv1`."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1)
        )
        self.layer1 = nn.Sequential(Block(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.features(x)))


NESTED_HOSTS = ["features.0", "features.3", "layer1.0.conv1", "layer1.0.conv2", "head.1"]


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    """low_rank kernels for the hosts these tests use, compiled once for the module (a kernel
    depends on the layer's signature, never its weights); each test wraps with its own cache."""
    registry = esper.LocalKernelRegistry()
    hosts = [nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(16, 7), nn.Linear(8, 8),
             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 5)]  # fmt: skip
    for host in hosts:
        registry.compile("low_rank", host)
    return registry


def low_rank(registry: esper.LocalKernelRegistry, layer: nn.Module) -> esper.KernelMeta:
    """The module registry's low_rank kernel for `layer`'s signature."""
    signature = esper.HostSignature.of(layer)
    return next(m for m in registry.list(name="low_rank") if m.host == signature)


def record_events(morphable: esper.MorphableModel) -> list[LifecycleEvent]:
    events: list[LifecycleEvent] = []
    morphable.add_listener(events.append)
    return events


def edges(events: list[LifecycleEvent]) -> list[tuple[SeedState, SeedState]]:
    return [(e.from_state, e.to_state) for e in events]


@pytest.fixture
def fresh_default_registry(monkeypatch: pytest.MonkeyPatch) -> esper.LocalKernelRegistry:
    """esper.default_registry() is process-global: give this test its own, in memory."""
    monkeypatch.delenv("ESPER_KERNEL_DIR", raising=False)
    monkeypatch.setattr(esper.registry, "_default", None)
    return esper.default_registry()


# ------------------------------------------------------------------ the documented snippet
async def test_developers_snippet_with_the_default_registry(
    mlp: nn.Module, fresh_default_registry: esper.LocalKernelRegistry
) -> None:
    model = mlp
    input_tensor = torch.randn(8, 16)
    esper.default_registry().compile("low_rank", model.layer1, tags=["efficiency_kernel_v1"])
    expected_host = model(input_tensor)

    morphable = esper.wrap(model, seeds_per_layer=4)
    await morphable.load_kernel("layer1", seed_idx=0, kernel_id="efficiency_kernel_v1")
    morphable.set_seed_alpha("layer1", seed_idx=0, alpha=0.7)
    output = morphable(input_tensor)

    seed = morphable.seeds("layer1")[0]
    assert seed.state is S.ACTIVE
    assert seed.alpha == pytest.approx(0.7)
    assert seed.kernel_id == fresh_default_registry.tags()["efficiency_kernel_v1"]
    assert output.shape == (8, 4)
    # low_rank starts function-preserving (last layer zero): the add seed changes nothing yet.
    torch.testing.assert_close(output, expected_host)
    assert morphable.layer("layer1").layout.alpha[0].item() == pytest.approx(0.7)


async def test_developers_snippet_with_an_explicit_cache(
    mlp: nn.Module, registry: esper.LocalKernelRegistry
) -> None:
    model = mlp
    input_tensor = torch.randn(8, 16)
    meta = esper.LocalKernelRegistry.compile(
        registry, "low_rank", model.layer1, tags=["efficiency_kernel_v1"]
    )

    morphable = esper.wrap(model, seeds_per_layer=4, kernels=esper.KernelCache([registry]))
    await morphable.load_kernel("layer1", seed_idx=0, kernel_id="efficiency_kernel_v1")
    morphable.set_seed_alpha("layer1", seed_idx=0, alpha=0.7)
    output = morphable(input_tensor)

    assert output.shape == (8, 4)
    assert morphable.seeds("layer1")[0].kernel_id == meta.kernel_id
    # the tag lives in this registry only, not in the process-wide default one
    with pytest.raises(UnknownKernelError):
        await esper.wrap(type(mlp)(), kernels=esper.KernelCache([])).load_kernel(
            "layer1", 0, "efficiency_kernel_v1"
        )


def test_quickstart_example_runs() -> None:
    script = REPO_ROOT / "examples" / "library_quickstart.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "output shape: (8, 4)" in out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert "seed layer1:0 ACTIVE alpha=0.7 krn_" in out
    assert out.count("DORMANT") == 3


# ----------------------------------------------------------------------------------- wrap
def test_wrap_names_layers_by_dotted_module_path() -> None:
    model = NestedNet()
    morphable = esper.wrap(model, seeds_per_layer=2, kernels=esper.KernelCache([]))
    assert morphable.layer_names() == NESTED_HOSTS
    assert isinstance(model.layer1[0].conv1, esper.KasminaLayer)
    assert isinstance(model.features[3], esper.KasminaLayer)
    assert morphable.layer("layer1.0.conv1").layer_name == "layer1.0.conv1"
    assert isinstance(model.layer1[0].bn, nn.BatchNorm2d)  # only Linear and Conv2d are wrapped
    assert morphable(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_wrap_leaves_the_forward_unchanged() -> None:
    model = NestedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    morphable = esper.wrap(model, kernels=esper.KernelCache([]))
    assert torch.equal(morphable(x), before)


def test_wrap_selected_layers_only() -> None:
    model = NestedNet()
    morphable = esper.wrap(
        model, layers=["layer1.0.conv2", "head.1"], kernels=esper.KernelCache([])
    )
    assert morphable.layer_names() == ["layer1.0.conv2", "head.1"]
    assert isinstance(model.features[0], nn.Conv2d)
    assert not isinstance(model.features[0], esper.KasminaLayer)


def test_wrap_unknown_layer_lists_the_hosts() -> None:
    with pytest.raises(UnknownLayerError) as info:
        esper.wrap(NestedNet(), layers=["layer1.0.conv3"])
    message = str(info.value)
    assert "layer1.0.conv3" in message
    assert all(name in message for name in NESTED_HOSTS)


def test_wrap_non_host_layer_is_unsupported() -> None:
    with pytest.raises(UnsupportedHostError, match="BatchNorm2d"):
        esper.wrap(NestedNet(), layers=["layer1.0.bn"])


def test_wrap_model_without_hosts_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        esper.wrap(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_wrap_a_bare_layer_or_an_empty_selection_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"itself an nn\.Linear"):
        esper.wrap(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="selects no layer"):
        esper.wrap(NestedNet(), layers=[])


def test_wrapping_twice_is_a_config_error(mlp: nn.Module) -> None:
    morphable = esper.wrap(mlp, kernels=esper.KernelCache([]))
    with pytest.raises(ConfigError):
        esper.wrap(morphable)
    with pytest.raises(ConfigError):  # the same model object, wrapped again
        esper.wrap(mlp)
    assert isinstance(mlp.layer1.base_layer, nn.Linear)  # not wrapped a second time


def test_wrap_rejects_a_layer_named_twice(mlp: nn.Module) -> None:
    with pytest.raises(ConfigError):
        esper.wrap(mlp, layers=["layer1", "layer1"])
    assert isinstance(mlp.layer1, nn.Linear)


def test_unknown_layer_in_calls(mlp: nn.Module, cache: esper.KernelCache) -> None:
    morphable = esper.wrap(mlp, kernels=cache)
    with pytest.raises(UnknownLayerError, match="layer1, layer2"):
        morphable.set_seed_alpha("layer3", 0, 0.5)
    with pytest.raises(UnknownLayerError):
        morphable.seeds("nope")


def test_seeds_lists_every_slot(mlp: nn.Module, cache: esper.KernelCache) -> None:
    morphable = esper.wrap(mlp, seeds_per_layer=3, kernels=cache)
    seeds = morphable.seeds()
    assert [(s.layer, s.seed) for s in seeds] == [
        ("layer1", 0), ("layer1", 1), ("layer1", 2), ("layer2", 0), ("layer2", 1), ("layer2", 2),
    ]  # fmt: skip
    assert all(s.state is S.DORMANT and s.kernel_id is None and s.alpha == 0.0 for s in seeds)
    assert len(morphable.seeds("layer2")) == 3


# ------------------------------------------------------------------------ load / unload
async def test_load_and_unload_emit_every_transition(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    meta = low_rank(registry, mlp.layer2)
    morphable = esper.wrap(mlp, kernels=cache)
    events = record_events(morphable)

    info = await morphable.load_kernel("layer2", 1, meta.kernel_id, alpha=0.25)
    assert (info.state, info.alpha, info.kernel_id) == (S.ACTIVE, 0.25, meta.kernel_id)
    assert edges(events) == [(S.DORMANT, S.ALLOCATED), (S.ALLOCATED, S.LOADING),
                             (S.LOADING, S.ACTIVE)]  # fmt: skip
    assert len(morphable.seed_parameters()) == 2

    morphable.unload_seed("layer2", 1)
    assert edges(events)[3:] == [(S.ACTIVE, S.RETIRING), (S.RETIRING, S.RECYCLING),
                                 (S.RECYCLING, S.DORMANT)]  # fmt: skip
    assert all(e.layer == "layer2" and e.seed == 1 for e in events)
    assert events[3].reason == "unloaded by caller"
    info = morphable.seeds("layer2")[1]
    assert (info.state, info.alpha, info.kernel_id) == (S.DORMANT, 0.0, None)
    assert morphable.seed_parameters() == []
    assert morphable.layer("layer2").layout.alpha[1].item() == 0.0
    # the slot can be used again
    await morphable.load_kernel("layer2", 1, meta.kernel_id)
    assert morphable.seeds("layer2")[1].state is S.ACTIVE


async def test_retire_with_ramp_recycles_after_the_ramp(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.8)
    events = record_events(morphable)
    morphable.retire_seed("layer1", 0, ramp_steps=4, reason="poor contribution")
    assert morphable.seeds("layer1")[0].state is S.RETIRING
    alphas = []
    for _ in range(4):
        morphable.step()
        alphas.append(morphable.seeds("layer1")[0].alpha)
    assert alphas[:3] == pytest.approx([0.6, 0.4, 0.2])
    assert morphable.seeds("layer1")[0].state is S.DORMANT
    assert edges(events) == [(S.ACTIVE, S.RETIRING), (S.RETIRING, S.RECYCLING),
                             (S.RECYCLING, S.DORMANT)]  # fmt: skip
    assert events[0].reason == "poor contribution"


async def test_load_unknown_kernel_leaves_slot_dormant(
    mlp: nn.Module, cache: esper.KernelCache
) -> None:
    morphable = esper.wrap(mlp, kernels=cache)
    events = record_events(morphable)
    with pytest.raises(UnknownKernelError, match="no_such_kernel"):
        await morphable.load_kernel("layer1", 0, "no_such_kernel")
    assert morphable.seeds("layer1")[0].state is S.DORMANT
    assert events[-1].to_state is S.DORMANT
    assert events[-1].reason.startswith("load failed")
    assert "UnknownKernelError" in events[-1].reason


async def test_load_kernel_for_another_host_shape_fails_typed(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    other = low_rank(registry, nn.Linear(16, 7))
    morphable = esper.wrap(mlp, kernels=cache)
    events = record_events(morphable)
    with pytest.raises(KernelShapeError, match="layer1"):
        await morphable.load_kernel("layer1", 2, other.kernel_id)
    info = morphable.seeds("layer1")[2]
    assert (info.state, info.kernel_id) == (S.DORMANT, None)
    assert edges(events) == [(S.DORMANT, S.ALLOCATED), (S.ALLOCATED, S.LOADING),
                             (S.LOADING, S.DORMANT)]  # fmt: skip
    assert events[-1].reason.startswith("load failed: KernelShapeError")
    assert events[-1].kernel_id == other.kernel_id
    assert morphable.seed_parameters() == []
    x = torch.randn(4, 16)
    assert torch.equal(morphable(x), mlp(x))


def test_load_kernel_sync_outside_an_event_loop(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    registry.tag("lr1", low_rank(registry, mlp.layer1).kernel_id)
    morphable = esper.wrap(mlp, kernels=cache)
    info = morphable.load_kernel_sync("layer1", 3, "lr1", blend="lerp", alpha=0.4)
    assert (info.state, info.blend, info.alpha) == (S.ACTIVE, esper.BlendMode.LERP, 0.4)
    with pytest.raises(SeedStateError):  # the slot is taken
        morphable.load_kernel_sync("layer1", 3, "lr1")
    assert morphable.seeds("layer1")[3].state is S.ACTIVE


async def test_load_kernel_sync_inside_a_running_loop(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    registry.tag("lr1", low_rank(registry, mlp.layer1).kernel_id)
    morphable = esper.wrap(mlp, kernels=cache)
    assert morphable.load_kernel_sync("layer1", 0, "lr1").state is S.ACTIVE


# ---------------------------------------------------------------------- real training
def regression_task(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    y = torch.sin(x @ w) + 0.5 * (x[:, :4] ** 2)
    return x, y


def train(
    morphable: esper.MorphableModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
) -> None:
    for _ in range(steps):
        loss = nn.functional.mse_loss(morphable(x), y)
        optimizer.zero_grad()
        loss.backward()
        morphable.clip_seed_gradients()
        optimizer.step()
        morphable.step()


def eval_loss(morphable: esper.MorphableModel, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(morphable(x), y).item()


async def test_trained_seed_on_frozen_host_lowers_the_loss(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    x, y = regression_task()
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    for p in morphable.host_parameters():
        p.requires_grad_(False)
    host_loss = eval_loss(morphable, x, y)

    await morphable.load_kernel("layer1", 0, meta.kernel_id, blend="add")
    assert eval_loss(morphable, x, y) == pytest.approx(host_loss)  # α = 0: function-preserving
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)  # frozen: no grads
    morphable.attach_optimizer(optimizer, lr=3e-2, max_grad_norm=1.0)
    morphable.ramp_seed_alpha("layer1", 0, 1.0, steps=5)
    train(morphable, optimizer, x, y, steps=60)

    assert morphable.seeds("layer1")[0].alpha == 1.0
    seeded_loss = eval_loss(morphable, x, y)
    assert seeded_loss < 0.75 * host_loss
    with morphable.seed_alpha_forced("layer1", 0, 0.0):
        counterfactual = eval_loss(morphable, x, y)
    assert counterfactual == pytest.approx(host_loss)  # the host did not move
    assert morphable.seeds("layer1")[0].alpha == 1.0  # restored after the context


async def test_seed_trains_with_the_host_and_contribution_is_measured(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    x, y = regression_task()
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)
    morphable.attach_optimizer(optimizer, lr=1e-2, max_grad_norm=1.0)
    await morphable.load_kernel("layer1", 1, meta.kernel_id, alpha=0.0)
    assert math.isnan(morphable.layer("layer1").layout.contribution[1].item())

    host_before = [p.detach().clone() for p in morphable.host_parameters()]
    seed_before = [p.detach().clone() for p in morphable.seed_parameters()]
    morphable.ramp_seed_alpha("layer1", 1, 1.0, steps=3)
    start = eval_loss(morphable, x, y)
    train(morphable, optimizer, x, y, steps=40)
    assert eval_loss(morphable, x, y) < start
    host_after, seed_after = morphable.host_parameters(), morphable.seed_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(host_before, host_after, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(seed_before, seed_after, strict=True))

    with morphable.seed_alpha_forced("layer1", 1, 0.0):
        without = eval_loss(morphable, x, y)
    assert without != pytest.approx(eval_loss(morphable, x, y), rel=1e-4)

    contribution = morphable.measure_contribution("layer1", 1, lambda: -eval_loss(morphable, x, y))
    assert math.isfinite(contribution)
    assert contribution == pytest.approx(without - eval_loss(morphable, x, y), rel=1e-5)
    recorded = morphable.layer("layer1").layout.contribution[1].item()
    assert recorded == pytest.approx(contribution)
    assert math.isnan(morphable.layer("layer1").layout.contribution[0].item())


async def test_grad_isolation_keeps_gradient_out_of_earlier_layers(
    registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    meta = low_rank(registry, model[2])
    morphable = esper.wrap(model, layers=["2"], kernels=cache)
    await morphable.load_kernel("2", 0, meta.kernel_id, alpha=1.0, grad_isolation=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        morphable.layer("2").seed_module(0).get_parameter("1.weight").normal_()
    morphable(x).sum().backward()
    isolated = model[0].weight.grad.clone()
    model.zero_grad()
    with morphable.seed_alpha_forced("2", 0, 0.0):
        morphable(x).sum().backward()
    # with isolation, layer 0 receives exactly the host path's gradient, seed or no seed
    torch.testing.assert_close(isolated, model[0].weight.grad)
    assert morphable.seeds("2")[0].grad_isolation


# ----------------------------------------------------------------- optimizer param groups
def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [str(g.get("name", "")) for g in optimizer.param_groups]


async def test_seeds_join_and_leave_the_optimizer_in_their_own_group(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    k1 = low_rank(registry, mlp.layer1)
    k2 = low_rank(registry, mlp.layer2)
    morphable = esper.wrap(mlp, kernels=cache)
    await morphable.load_kernel("layer1", 0, k1.kernel_id, alpha=0.5)  # before attach: joins now
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-3)
    morphable.attach_optimizer(optimizer, lr=0.05, max_grad_norm=0.5, weight_decay=0.01)
    await morphable.load_kernel("layer2", 3, k2.kernel_id, alpha=0.5)  # after attach: joins on load

    assert group_names(optimizer) == ["", "seed:layer1:0", "seed:layer2:3"]
    seed_group = optimizer.param_groups[2]
    assert seed_group["lr"] == 0.05 and seed_group["max_grad_norm"] == 0.5
    assert seed_group["weight_decay"] == 0.01
    assert optimizer.param_groups[0]["lr"] == 1e-3
    ids = {id(p) for p in seed_group["params"]}
    assert ids == {id(p) for p in morphable.seed_parameters("layer2", 3)}

    x, y = regression_task(64)
    train(morphable, optimizer, x, y, steps=2)
    assert all(p in optimizer.state for p in morphable.seed_parameters("layer2", 3))
    leaving = morphable.seed_parameters("layer2", 3)

    morphable.retire_seed("layer2", 3)
    assert group_names(optimizer) == ["", "seed:layer1:0"]
    assert not any(p in optimizer.state for p in leaving)
    train(morphable, optimizer, x, y, steps=1)  # the optimizer still steps


async def test_seed_retired_by_ramp_leaves_the_optimizer_when_recycled(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=1e-3)
    morphable.attach_optimizer(optimizer)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.5)
    morphable.retire_seed("layer1", 0, ramp_steps=2)
    assert group_names(optimizer) == ["", "seed:layer1:0"]  # still training while it ramps down
    morphable.step()
    morphable.step()
    assert group_names(optimizer) == [""]


async def test_seed_retired_by_the_breaker_in_forward_leaves_the_optimizer_at_the_next_step(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache, error_threshold=1)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=1e-3)
    morphable.attach_optimizer(optimizer)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.5)
    morphable.step()  # nothing retired yet: the group stays
    assert group_names(optimizer) == ["", "seed:layer1:0"]
    with torch.no_grad():
        for p in morphable.seed_parameters("layer1", 0):
            p.fill_(float("nan"))
    morphable(torch.randn(2, 16))  # non-finite output → the breaker retires it at once
    morphable.step()
    assert group_names(optimizer) == [""]


async def test_reloading_a_slot_before_step_gets_a_fresh_group(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    """A slot emptied by the circuit breaker (in forward) and refilled before `step()` must not
    keep the old seed's dead group: the new seed's parameters must be optimized."""
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache, error_threshold=1)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=1e-3)
    morphable.attach_optimizer(optimizer, lr=0.1)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.5)
    with torch.no_grad():
        for p in morphable.seed_parameters("layer1", 0):
            p.fill_(float("nan"))
    morphable(torch.randn(2, 16))  # non-finite output → the breaker retires it at once
    assert morphable.seeds("layer1")[0].state is S.DORMANT

    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.5)
    group = next(g for g in optimizer.param_groups if g.get("name") == "seed:layer1:0")
    assert {id(p) for p in group["params"]} == {id(p) for p in morphable.seed_parameters()}


async def test_clip_seed_gradients_clips_only_seed_groups(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=1e-3)
    morphable.attach_optimizer(optimizer, max_grad_norm=1e-3)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=1.0)
    x, y = regression_task(64)
    (100 * nn.functional.mse_loss(morphable(x), y)).backward()
    host_grads = [p.grad.clone() for p in morphable.host_parameters()]
    seed_norm_before = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in morphable.seed_parameters()])
    )
    assert seed_norm_before > 1e-3

    morphable.clip_seed_gradients()
    seed_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in morphable.seed_parameters()])
    )
    assert seed_norm.item() == pytest.approx(1e-3, rel=1e-3)
    hosts = morphable.host_parameters()
    assert all(torch.equal(a, p.grad) for a, p in zip(host_grads, hosts, strict=True))


async def test_seed_and_host_parameters_partition_parameters(
    cnn: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    k_conv = low_rank(registry, cnn.features[2])
    k_head = low_rank(registry, cnn.head)
    morphable = esper.wrap(cnn, kernels=cache)
    await morphable.load_kernel("features.2", 1, k_conv.kernel_id)
    await morphable.load_kernel("head", 0, k_head.kernel_id, blend="lerp")
    seeds = morphable.seed_parameters()
    hosts = morphable.host_parameters()
    everything = list(morphable.parameters())
    assert len(seeds) == 4 and len(hosts) == 6
    assert {id(p) for p in seeds} | {id(p) for p in hosts} == {id(p) for p in everything}
    assert not {id(p) for p in seeds} & {id(p) for p in hosts}
    assert len(seeds) + len(hosts) == len(everything)
    assert {id(p) for p in morphable.seed_parameters("head")} == {
        id(p) for p in morphable.layer("head").seed_module(0).parameters()
    }


async def test_concurrent_loads_share_one_fetch_but_not_parameters(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    kernel_id = low_rank(registry, mlp.layer1).kernel_id
    morphable = esper.wrap(mlp, kernels=cache)
    infos = await asyncio.gather(
        morphable.load_kernel("layer1", 0, kernel_id), morphable.load_kernel("layer1", 1, kernel_id)
    )
    assert [i.state for i in infos] == [S.ACTIVE, S.ACTIVE]
    assert cache.stats()["local"]["hits"] == 1  # one fetch from the registry for both
    first, second = morphable.seed_parameters("layer1", 0), morphable.seed_parameters("layer1", 1)
    assert not {id(p) for p in first} & {id(p) for p in second}


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's GraphModule deepcopy
async def test_deepcopy_gives_an_independent_model_sharing_the_cache(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    kernel_id = low_rank(registry, mlp.layer1).kernel_id
    morphable = esper.wrap(mlp, kernels=cache)
    await morphable.load_kernel("layer1", 0, kernel_id, alpha=0.5)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=0.1)
    morphable.attach_optimizer(optimizer)
    x = torch.randn(3, 16)

    twin = copy.deepcopy(morphable)
    assert twin.kernels is morphable.kernels
    assert torch.equal(twin(x), morphable(x))
    assert [(s.state, s.alpha, s.kernel_id) for s in twin.seeds()] == [
        (s.state, s.alpha, s.kernel_id) for s in morphable.seeds()
    ]
    with torch.no_grad():
        for p in morphable.seed_parameters():
            p.add_(1.0)
    assert not torch.equal(twin(x), morphable(x))
    # the twin is attached to no optimizer: retiring its seed leaves the original's group alone
    twin.retire_seed("layer1", 0)
    assert [g.get("name") for g in optimizer.param_groups] == [None, "seed:layer1:0"]
    assert morphable.seeds("layer1")[0].state is S.ACTIVE
    await twin.load_kernel("layer1", 0, kernel_id)
    assert twin.layer("layer1") is not morphable.layer("layer1")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
async def test_seed_alpha_forced_refuses_an_alpha_outside_the_unit_interval(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache, alpha: float
) -> None:
    meta = low_rank(registry, mlp.layer1)
    morphable = esper.wrap(mlp, kernels=cache)
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.4)
    with (
        pytest.raises(esper.exceptions.AlphaRangeError, match="layer1"),
        morphable.seed_alpha_forced("layer1", 0, alpha),
    ):
        pass
    assert morphable.layer("layer1").layout.alpha[0].item() == pytest.approx(0.4)

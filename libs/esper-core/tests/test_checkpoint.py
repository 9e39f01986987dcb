"""Checkpoints of wrapped models: seeds, α, kernels, blend modes and ramps survive a round trip."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.exceptions import ConfigError, UnknownKernelError
from esper.kasmina import SeedState

S = SeedState


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(morphable: esper.MorphableModel, steps: int) -> None:
    x, y = data()
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)
    morphable.attach_optimizer(optimizer, lr=5e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(morphable(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        morphable.step()


def snapshot(morphable: esper.MorphableModel) -> list[tuple[Any, ...]]:
    return [(s.layer, s.seed, s.state, s.alpha, s.kernel_id, s.blend) for s in morphable.seeds()]


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    """One low_rank kernel per SmallCNN layer, compiled once for the module (a kernel depends on
    the layer's signature, never its weights). Each test wraps with its own KernelCache."""
    registry = esper.LocalKernelRegistry()
    model = SmallCNN()
    for layer in (model.conv, model.fc1, model.fc2):
        registry.compile("low_rank", layer)
    return registry


def kernel_for(registry: esper.LocalKernelRegistry, layer: nn.Module) -> str:
    signature = esper.HostSignature.of(layer)
    return next(m.kernel_id for m in registry.list(name="low_rank") if m.host == signature)


async def seeded_model(
    registry: esper.LocalKernelRegistry,
) -> tuple[esper.MorphableModel, dict[str, str]]:
    """A model with an add seed in the conv layer and a lerp seed in fc1."""
    model = SmallCNN()
    kernels = {name: kernel_for(registry, getattr(model, name)) for name in ("conv", "fc1")}
    morphable = esper.wrap(model, seeds_per_layer=3, kernels=esper.KernelCache([registry]))
    await morphable.load_kernel("conv", 1, kernels["conv"], blend="add", alpha=0.6)
    await morphable.load_kernel("fc1", 2, kernels["fc1"], blend="lerp", alpha=0.3)
    return morphable, kernels


def fresh(registry: esper.LocalKernelRegistry, seeds: int = 3) -> esper.MorphableModel:
    return esper.wrap(SmallCNN(), seeds_per_layer=seeds, kernels=esper.KernelCache([registry]))


def through_bytes(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: a checkpoint holds no pickled code


def same(sd: dict[str, Any]) -> dict[str, Any]:
    return sd


@pytest.mark.parametrize("transport", [same, through_bytes], ids=["in_memory", "torch_save"])
async def test_round_trip_restores_seeds_and_outputs_bit_for_bit(
    registry: esper.LocalKernelRegistry, transport: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    source, kernels = await seeded_model(registry)
    initial = [p.detach().clone() for p in source.seed_parameters()]
    train(source, steps=3)
    trained = source.seed_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(initial, trained, strict=True))
    source.eval()
    x, _ = data()

    restored = fresh(registry)
    restored.load_state_dict(transport(source.state_dict()))
    restored.eval()

    assert snapshot(restored) == snapshot(source)
    conv, fc1 = restored.seeds("conv")[1], restored.seeds("fc1")[2]
    assert (conv.state, conv.alpha, conv.kernel_id, conv.blend) == (
        S.ACTIVE, pytest.approx(0.6), kernels["conv"], esper.BlendMode.ADD,
    )  # fmt: skip
    assert (fc1.state, fc1.alpha, fc1.kernel_id, fc1.blend) == (
        S.ACTIVE, pytest.approx(0.3), kernels["fc1"], esper.BlendMode.LERP,
    )  # fmt: skip
    for a, b in zip(source.seed_parameters(), restored.seed_parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(restored(x), source(x))
    layout_a, layout_b = source.layer("fc1").layout, restored.layer("fc1").layout
    assert torch.equal(layout_a.state, layout_b.state)
    assert torch.equal(layout_a.steps_in_state, layout_b.steps_in_state)


async def test_restored_model_keeps_training_with_seed_groups(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, _ = await seeded_model(registry)
    restored = fresh(registry)
    optimizer = torch.optim.SGD(restored.host_parameters(), lr=1e-2)
    restored.attach_optimizer(optimizer, lr=1e-2)
    restored.load_state_dict(source.state_dict())
    names = sorted(str(g.get("name", "")) for g in optimizer.param_groups)
    assert names == ["", "seed:conv:1", "seed:fc1:2"]
    in_groups = {id(p) for g in optimizer.param_groups[1:] for p in g["params"]}
    assert in_groups == {id(p) for p in restored.seed_parameters()}


async def test_retiring_seed_with_a_ramp_restores_and_finishes(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, _ = await seeded_model(registry)
    source.retire_seed("conv", 1, ramp_steps=4)
    source.step()  # α: 0.6 → 0.45, three steps left
    restored = fresh(registry)
    restored.load_state_dict(through_bytes(source.state_dict()))

    info = restored.seeds("conv")[1]
    assert info.state is S.RETIRING
    assert info.alpha == pytest.approx(0.45)
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(restored(x), source(x))
    for _ in range(3):
        assert restored.seeds("conv")[1].alpha == pytest.approx(source.seeds("conv")[1].alpha)
        source.step()
        restored.step()
    assert restored.seeds("conv")[1].state is S.DORMANT
    assert snapshot(restored) == snapshot(source)


async def test_checkpoint_naming_an_unknown_kernel_raises_typed(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, kernels = await seeded_model(registry)
    sd = source.state_dict()
    elsewhere = fresh(esper.LocalKernelRegistry())  # a registry without those kernels
    with pytest.raises(UnknownKernelError, match=kernels["conv"]):
        elsewhere.load_state_dict(sd)
    info = elsewhere.seeds("conv")[1]
    assert (info.state, info.kernel_id) == (S.DORMANT, None)


async def test_checkpoint_with_other_seeds_per_layer_is_a_config_error(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, _ = await seeded_model(registry)
    with pytest.raises(ConfigError, match="3 seeds"):
        fresh(registry, seeds=2).load_state_dict(source.state_dict())


async def test_loading_into_a_seeded_model_replaces_its_seeds(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, kernels = await seeded_model(registry)
    train(source, steps=2)
    target = fresh(registry)
    other = kernel_for(registry, target.layer("fc2").base_layer)
    await target.load_kernel("fc2", 0, other, alpha=0.9)  # not in the checkpoint
    await target.load_kernel("fc1", 2, kernels["fc1"], blend="add", alpha=0.1)  # other blend
    await target.load_kernel("conv", 1, kernels["conv"], alpha=0.2)  # same kernel, same slot
    target.ramp_seed_alpha("conv", 1, 1.0, steps=10)  # a ramp the checkpoint does not have
    optimizer = torch.optim.SGD(target.host_parameters(), lr=1e-2)
    target.attach_optimizer(optimizer)

    target.load_state_dict(source.state_dict())

    assert snapshot(target) == snapshot(source)
    names = sorted(str(g.get("name", "")) for g in optimizer.param_groups)
    assert names == ["", "seed:conv:1", "seed:fc1:2"]
    source.eval()
    target.eval()
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    target.step()  # no leftover ramp moves the restored α
    source.step()
    assert snapshot(target) == snapshot(source)


async def test_loading_an_active_checkpoint_over_a_retiring_seed(
    registry: esper.LocalKernelRegistry,
) -> None:
    source, kernels = await seeded_model(registry)
    target = fresh(registry)
    await target.load_kernel("conv", 1, kernels["conv"], alpha=0.6)
    target.retire_seed("conv", 1, ramp_steps=5)
    target.load_state_dict(source.state_dict())
    assert snapshot(target) == snapshot(source)
    target.step()
    assert target.seeds("conv")[1].state is S.ACTIVE
    assert target.seeds("conv")[1].alpha == pytest.approx(0.6)


async def test_unseeded_checkpoint_empties_a_seeded_model(
    registry: esper.LocalKernelRegistry,
) -> None:
    empty = fresh(registry)
    target, _ = await seeded_model(registry)
    target.load_state_dict(empty.state_dict())
    assert all(s.state is S.DORMANT for s in target.seeds())
    assert target.seed_parameters() == []


async def test_checkpoint_of_a_module_holding_the_wrapped_model(
    registry: esper.LocalKernelRegistry,
) -> None:
    """Loading the outer module still replaces seeds and moves optimizer groups."""
    source, kernels = await seeded_model(registry)
    outer_sd = nn.ModuleDict({"net": source}).state_dict()
    target = fresh(registry)
    await target.load_kernel("fc1", 2, kernels["fc1"], blend="add")
    target.ramp_seed_alpha("fc1", 2, 1.0, steps=5)
    optimizer = torch.optim.SGD(target.host_parameters(), lr=1e-2)
    target.attach_optimizer(optimizer)

    nn.ModuleDict({"net": target}).load_state_dict(outer_sd)

    assert snapshot(target) == snapshot(source)
    in_groups = {id(p) for g in optimizer.param_groups[1:] for p in g["params"]}
    assert in_groups == {id(p) for p in target.seed_parameters()}
    assert len(optimizer.param_groups) == 3

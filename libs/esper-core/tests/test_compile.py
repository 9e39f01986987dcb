"""torch.compile of a wrapped model: α changes reuse the compiled graph; seed changes recompile."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import esper


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.compiles += 1
        return gm.forward


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    """The two kernels these tests load, compiled once for the module."""
    registry = esper.LocalKernelRegistry()
    registry.compile("low_rank", nn.Linear(16, 32), tags=["layer1_kernel"])
    registry.compile("low_rank", nn.Linear(32, 4), tags=["layer2_kernel"])
    return registry


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


async def wrapped_with_seed(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> esper.MorphableModel:
    morphable = esper.wrap(mlp, kernels=cache)
    await morphable.load_kernel("layer1", 0, "layer1_kernel", alpha=0.2)
    with torch.no_grad():  # a trained seed: its output is no longer zero, so α shows
        for p in morphable.seed_parameters():
            p.normal_(std=0.3)
    return morphable.eval()


async def test_alpha_changes_do_not_recompile(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    morphable = await wrapped_with_seed(mlp, registry, cache)
    backend = CountingBackend()
    compiled = torch.compile(morphable, backend=backend)
    x = torch.randn(6, 16)

    with torch.no_grad():
        first = compiled(x)
        torch.testing.assert_close(first, morphable(x))
        assert backend.compiles == 1  # one graph: no graph break around the seed

        morphable.set_seed_alpha("layer1", 0, 0.9)
        after_set = compiled(x)
        torch.testing.assert_close(after_set, morphable(x))
        assert not torch.allclose(after_set, first)

        morphable.ramp_seed_alpha("layer1", 0, 0.0, steps=3)
        outputs = []
        for _ in range(3):
            morphable.step()
            out = compiled(x)
            torch.testing.assert_close(out, morphable(x))
            outputs.append(out)
        assert not torch.allclose(outputs[0], outputs[1])
        with morphable.seed_alpha_forced("layer1", 0, 1.0):
            torch.testing.assert_close(compiled(x), morphable(x))

    assert backend.compiles == 1
    # at α = 0 the add seed is gone from the output: the host alone
    layer1, layer2 = morphable.layer("layer1").base_layer, morphable.layer("layer2").base_layer
    with torch.no_grad():
        torch.testing.assert_close(outputs[-1], layer2(torch.relu(layer1(x))))


async def test_adding_a_seed_recompiles_once(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    morphable = await wrapped_with_seed(mlp, registry, cache)
    backend = CountingBackend()
    compiled = torch.compile(morphable, backend=backend)
    x = torch.randn(6, 16)
    with torch.no_grad():
        compiled(x)
        assert backend.compiles == 1

        await morphable.load_kernel("layer2", 1, "layer2_kernel", blend="lerp", alpha=0.5)
        out = compiled(x)
        assert backend.compiles == 2
        torch.testing.assert_close(out, morphable(x))
        compiled(x)
        morphable.set_seed_alpha("layer2", 1, 0.25)
        torch.testing.assert_close(compiled(x), morphable(x))
    assert backend.compiles == 2


async def test_compiled_training_step_updates_seed_without_recompiling(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    morphable = (await wrapped_with_seed(mlp, registry, cache)).train()
    backend = CountingBackend()
    compiled = torch.compile(morphable, backend=backend)
    optimizer = torch.optim.SGD(morphable.host_parameters(), lr=0.05)
    morphable.attach_optimizer(optimizer, lr=0.05)
    morphable.ramp_seed_alpha("layer1", 0, 1.0, steps=4)
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    before = [p.detach().clone() for p in morphable.seed_parameters()]
    for _ in range(5):
        loss = nn.functional.mse_loss(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        morphable.step()
    assert morphable.seeds("layer1")[0].alpha == 1.0
    after = morphable.seed_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert backend.compiles == 1


@pytest.mark.skipif(
    not os.environ.get("ESPER_INDUCTOR_TESTS"),
    reason="inductor compiles take ~35 s on a small CPU box; set ESPER_INDUCTOR_TESTS=1",
)
async def test_inductor_alpha_change_without_recompiling(
    mlp: nn.Module, registry: esper.LocalKernelRegistry, cache: esper.KernelCache
) -> None:
    morphable = await wrapped_with_seed(mlp, registry, cache)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(morphable)
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), morphable(x))
        morphable.set_seed_alpha("layer1", 0, 0.8)
        torch.testing.assert_close(compiled(x), morphable(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

"""Where a wrapped model's tensors live: every buffer and parameter (host, StateLayout, seeds) is
created on the host's device and moves with the model; forward never reads a device tensor to
decide what runs, so a model on `meta` (no data at all) still runs its seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper
from esper.kasmina import KasminaLayer

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
)
LAYOUT_DTYPES = {
    "state": torch.int8,
    "alpha": torch.float32,
    "steps_in_state": torch.int64,
    "error_count": torch.int64,
    "contribution": torch.float32,
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)  # a host buffer beside the layouts
        self.layer2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.relu(self.norm(self.layer1(x))))


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    """One low_rank kernel for `layer1`, compiled once (a kernel depends on the signature only)."""
    registry = esper.LocalKernelRegistry()
    registry.compile("low_rank", nn.Linear(16, 32))
    return registry


def wrap(model: nn.Module, registry: esper.LocalKernelRegistry) -> esper.MorphableModel:
    return esper.wrap(model, seeds_per_layer=2, kernels=esper.KernelCache([registry]))


def load_seed(morphable: esper.MorphableModel, registry: esper.LocalKernelRegistry) -> None:
    [meta] = registry.list(name="low_rank")
    morphable.load_kernel_sync("layer1", 1, meta.kernel_id, alpha=0.5)


def layers(morphable: esper.MorphableModel) -> list[KasminaLayer]:
    return list(morphable.layers.values())


def assert_all_on(morphable: esper.MorphableModel, device: torch.device) -> None:
    """Every parameter and buffer, by name; the layouts' buffers named one by one as well, so a
    layout that somehow left the module tree could not pass unseen."""
    misplaced = [
        f"{name} on {tensor.device}"
        for name, tensor in [*morphable.named_parameters(), *morphable.named_buffers()]
        if tensor.device != device
    ]
    for layer in layers(morphable):
        for name in LAYOUT_DTYPES:
            buffer = getattr(layer.layout, name)
            if buffer.device != device:
                misplaced.append(f"{layer.layer_name}.layout.{name} on {buffer.device}")
    assert misplaced == []


def assert_layout_dtypes(morphable: esper.MorphableModel) -> None:
    for layer in layers(morphable):
        assert {n: getattr(layer.layout, n).dtype for n in LAYOUT_DTYPES} == LAYOUT_DTYPES


def device_of(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ------------------------------------------------------------------ wrapping on a device
@pytest.mark.parametrize("wrap_inside", [False, True], ids=["wrapped-after", "wrapped-inside"])
def test_a_model_built_on_meta_is_wrapped_on_meta(
    registry: esper.LocalKernelRegistry, wrap_inside: bool
) -> None:
    """Built under `with torch.device("meta")`, and wrapped inside that block or after it: the
    layouts follow the host, not torch's default device."""
    meta = torch.device("meta")
    with meta:
        model = Net()
        morphable = wrap(model, registry) if wrap_inside else None
    morphable = morphable or wrap(model, registry)
    assert_all_on(morphable, meta)
    assert_layout_dtypes(morphable)

    load_seed(morphable, registry)  # the executor builds the seed on its host's device
    seed = morphable.layer("layer1").seed_module(1)
    assert seed is not None and all(p.device == meta for p in seed.parameters())
    assert_all_on(morphable, meta)
    out = morphable.eval()(torch.empty(3, 16, device=meta))  # the seed runs, with no data read
    assert (out.device, out.shape) == (meta, torch.Size([3, 4]))
    assert morphable.layer("layer1").running_seeds() == (1,)


@pytest.mark.parametrize("name", [CUDA])
def test_a_model_moved_to_a_device_before_wrapping_is_wrapped_there(
    registry: esper.LocalKernelRegistry, name: str
) -> None:
    """Tolaria's order: the model goes to the device first, then it is wrapped."""
    device = device_of(name)
    morphable = wrap(Net().to(device), registry)
    assert_all_on(morphable, device)
    load_seed(morphable, registry)
    assert_all_on(morphable, device)
    morphable.set_seed_alpha("layer1", 1, 0.25)
    morphable(torch.randn(8, 16, device=device)).sum().backward()
    morphable.step()  # ages the seed and polls the breaker on the device's buffers
    layout = morphable.layer("layer1").layout
    assert layout.alpha.tolist() == [0.0, 0.25]
    assert layout.steps_in_state.tolist() == [0, 1]


# ---------------------------------------------------------------------- moving a model
@pytest.mark.parametrize("name", ["meta", CUDA])
def test_moving_a_wrapped_model_moves_every_buffer_and_keeps_the_layout_dtypes(
    registry: esper.LocalKernelRegistry, name: str
) -> None:
    morphable = wrap(Net(), registry)
    load_seed(morphable, registry)
    assert_all_on(morphable, torch.device("cpu"))

    device = device_of(name)
    assert morphable.to(device) is morphable
    assert_all_on(morphable, device)
    assert_layout_dtypes(morphable)

    morphable.eval()(torch.empty(3, 16, device=device))
    if device.type != "meta":
        morphable.set_seed_alpha("layer1", 1, 0.75)
        assert morphable.layer("layer1").layout.alpha.tolist() == [0.0, 0.75]
        morphable.to("cpu")
        assert_all_on(morphable, torch.device("cpu"))


@pytest.mark.parametrize("name", [CUDA])
def test_cuda_and_half_move_the_layout_but_keep_its_dtypes(
    registry: esper.LocalKernelRegistry, name: str
) -> None:
    device = device_of(name)
    morphable = wrap(Net(), registry)
    load_seed(morphable, registry)
    morphable.set_seed_alpha("layer1", 1, 0.7)
    morphable.cuda().half()
    assert_all_on(morphable, device)
    assert_layout_dtypes(morphable)
    assert morphable.layer("layer1").layout.alpha[1].item() == torch.tensor(0.7).item()

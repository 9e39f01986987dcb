"""What a job's model costs (compute.py): forward FLOPs counted by PyTorch's counter, trainable
parameters of the host and its live seeds, and training FLOPs charged with the model as it is."""

from __future__ import annotations

import torch
from torch import nn

import esper
from esper.kernels import KernelCache
from tolaria.compute import ComputeMeter, forward_flops, trainable_parameters


def test_a_linear_forward_is_two_flops_per_multiply_add() -> None:
    assert forward_flops(nn.Linear(10, 20), torch.zeros(1, 10)) == 2 * 10 * 20


def test_a_two_layer_mlp_counts_both_matmuls_and_keeps_its_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    assert forward_flops(model, torch.zeros(1, 4)) == 2 * (4 * 16 + 16 * 3)
    assert model.training


def test_a_germinated_seed_adds_parameters_and_flops_and_is_counted_once() -> None:
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )
    registry = esper.LocalKernelRegistry()
    morphable = esper.wrap(host, seeds_per_layer=2, layers=["2"], kernels=KernelCache([registry]))
    meter = ComputeMeter(morphable, morphable, torch.zeros(8, 4))
    host_params = sum(p.numel() for p in host.parameters())
    assert meter.parameters() == host_params == trainable_parameters(host, None)
    before = meter.per_sample()
    assert before == 2 * (4 * 16 + 16 * 16 + 16 * 2)
    meter.charge(10)
    assert meter.total == 3 * before * 10

    kernel = registry.compile("residual_mlp", morphable.layer("2").base_layer)
    morphable.load_kernel_sync("2", 0, kernel.kernel_id)
    seed_params = sum(p.numel() for p in morphable.seed_parameters("2", 0))
    assert seed_params > 0
    assert meter.parameters() == host_params + seed_params
    after = meter.per_sample()
    assert after > before, "the seed's forward is counted once it is live"
    meter.charge(5)
    assert meter.total == 3 * before * 10 + 3 * after * 5

    # Counted once per change of the live seeds, not per call.
    counted = meter._seen
    assert meter.per_sample() == after and meter._seen is counted

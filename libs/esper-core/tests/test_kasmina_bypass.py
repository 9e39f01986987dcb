"""KasminaLayer's dormant bypass: while no seed runs, the layer's __call__ goes straight to the
host's forward. What it changes (hooks on `base_layer`) and what it must not (outputs, the blend
once a seed runs, state_dict, copies)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import esper
from esper.kasmina import BlendMode, KasminaLayer

KID = "krn_" + "cd" * 12


def attach(layer: KasminaLayer, seed: int, module: nn.Module, alpha: float) -> None:
    layer.begin_load(seed, "test")
    layer.mark_loading(seed, KID)
    layer.attach(seed, module, blend=BlendMode.ADD, alpha=alpha)


def host_calls(layer: KasminaLayer) -> list[int]:
    """A counter of the calls that go through the host module's own __call__ (its hooks)."""
    calls: list[int] = []
    layer.base_layer.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return calls


def test_a_bypassed_dormant_layer_runs_the_host_forward_without_its_module_call() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc", dormant_bypass=True)
    calls = host_calls(layer)
    outer: list[int] = []
    layer.register_forward_hook(lambda _m, _a, _o: outer.append(1))
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), layer.base_layer.forward(x))
    assert calls == []  # the documented cost: the host's own hooks are skipped while dormant
    assert outer == [1]  # the layer's hooks (the telemetry's) still run


def test_without_the_bypass_the_hosts_hooks_always_run() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    calls = host_calls(layer)
    layer(torch.randn(5, 4))
    assert calls == [1]


def test_a_running_seed_lifts_the_bypass_and_retiring_it_restores_it() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc", dormant_bypass=True)
    calls = host_calls(layer)
    seed = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    attach(layer, 1, seed, alpha=0.5)
    with torch.no_grad():
        expected = layer.base_layer(x) + 0.5 * seed(x)
    calls.clear()
    assert torch.allclose(layer(x), expected)
    assert calls == [1]  # the blend calls the host module
    layer.retire(1, "test")
    calls.clear()
    assert torch.equal(layer(x), layer.base_layer.forward(x))
    assert calls == []


def test_the_bypass_can_be_switched_at_any_time() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="fc")
    calls = host_calls(layer)
    x = torch.randn(5, 4)
    layer.dormant_bypass = True
    layer(x)
    assert calls == [] and layer.dormant_bypass
    layer.dormant_bypass = False
    layer(x)
    assert calls == [1] and not layer.dormant_bypass


def test_the_bypass_leaves_the_state_dict_as_it_is() -> None:
    torch.manual_seed(0)
    plain = esper.wrap(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    torch.manual_seed(0)
    bypassed = esper.wrap(
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), dormant_bypass=True
    )
    assert list(plain.state_dict()) == list(bypassed.state_dict())
    assert all(layer.dormant_bypass for layer in bypassed.layers.values())
    assert not any(layer.dormant_bypass for layer in plain.layers.values())
    x = torch.randn(7, 4)
    assert torch.equal(plain(x), bypassed(x))


@pytest.mark.parametrize("how", ["layer", "morphable"])
def test_a_copy_runs_its_own_host_not_the_original(how: str) -> None:
    """The bypass is a bound method of the host: a deep copy must rebind it to the copied host,
    or the copy would silently compute with the original's weights."""
    morphable = esper.wrap(nn.Sequential(nn.Linear(4, 3)), dormant_bypass=True)
    layer = morphable.layer("0")
    x = torch.randn(5, 4)
    if how == "layer":
        clone = copy.deepcopy(layer)
        run = clone
    else:
        clone_model = copy.deepcopy(morphable)
        clone = clone_model.layer("0")
        run = clone_model  # type: ignore[assignment]
    with torch.no_grad():
        clone.base_layer.weight.zero_()
        clone.base_layer.bias.fill_(1.0)
    assert torch.equal(run(x), torch.ones(5, 3))
    assert not torch.equal(layer(x), torch.ones(5, 3))  # the original is untouched

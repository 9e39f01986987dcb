"""The seed lifecycle: exactly the designed edges, one writer, one event per transition."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.exceptions import IllegalTransitionError, SeedIndexError, SeedStateError
from esper.kasmina import (
    LEGAL_TRANSITIONS,
    BlendMode,
    KasminaLayer,
    LifecycleEvent,
    LifecycleManager,
    SeedState,
    StateLayout,
)

S = SeedState
KID = "krn_" + "cd" * 12
# The lifecycle of the design: the happy path plus the failure edges.
DESIGNED_EDGES = {
    (S.DORMANT, S.ALLOCATED),
    (S.ALLOCATED, S.LOADING),
    (S.LOADING, S.ACTIVE),
    (S.ACTIVE, S.RETIRING),
    (S.RETIRING, S.RECYCLING),
    (S.RECYCLING, S.DORMANT),
    (S.ALLOCATED, S.DORMANT),  # allocation abandoned
    (S.LOADING, S.DORMANT),  # load failed
}


def manager_with(seed_state: SeedState) -> tuple[LifecycleManager, list[SeedState], StateLayout]:
    """A manager over 3 seeds where seed 1 is in `seed_state` and has aged 5 steps."""
    layout = StateLayout(3)
    mirror = [S.DORMANT, seed_state, S.DORMANT]
    layout.state[1] = int(seed_state)
    layout.steps_in_state[1] = 5
    return LifecycleManager("enc.0", layout, mirror), mirror, layout


def attach(layer: KasminaLayer, seed: int, alpha: float = 0.5) -> None:
    layer.begin_load(seed, "test")
    layer.mark_loading(seed, KID)
    layer.attach(seed, nn.Linear(4, 3), blend=BlendMode.ADD, alpha=alpha)


def recorded(layer: KasminaLayer) -> list[LifecycleEvent]:
    events: list[LifecycleEvent] = []
    layer.lifecycle.listeners.append(events.append)
    return events


def test_legal_transitions_are_exactly_the_designed_edges() -> None:
    assert set(LEGAL_TRANSITIONS) == set(SeedState)
    edges = {(src, dst) for src, dsts in LEGAL_TRANSITIONS.items() for dst in dsts}
    assert edges == DESIGNED_EDGES


@pytest.mark.parametrize(
    ("src", "dst"), list(itertools.product(SeedState, SeedState)), ids=lambda s: s.name
)
def test_every_pair_of_states_is_accepted_iff_it_is_an_edge(src: SeedState, dst: SeedState) -> None:
    manager, mirror, layout = manager_with(src)
    events: list[LifecycleEvent] = []
    manager.listeners.append(events.append)
    if (src, dst) in DESIGNED_EDGES:
        manager.check(1, dst)
        event = manager.transition(1, dst, "because", KID)
        assert mirror == [S.DORMANT, dst, S.DORMANT]
        assert layout.state.tolist() == [0, int(dst), 0]
        assert layout.steps_in_state.tolist() == [0, 0, 0]  # reset on entering a state
        assert events == [event]
        assert (event.layer, event.seed, event.from_state, event.to_state) == ("enc.0", 1, src, dst)
        assert (event.reason, event.kernel_id) == ("because", KID)
    else:
        message = rf"seed 1 of layer 'enc\.0': {src.name} → {dst.name} is not a lifecycle edge"
        with pytest.raises(IllegalTransitionError, match=message):
            manager.check(1, dst)
        with pytest.raises(IllegalTransitionError, match=message):
            manager.transition(1, dst, "because", KID)
        assert mirror == [S.DORMANT, src, S.DORMANT]
        assert layout.state.tolist() == [0, int(src), 0]
        assert layout.steps_in_state.tolist() == [0, 5, 0]
        assert events == []


def test_illegal_transition_error_is_a_seed_state_error_that_lists_the_allowed_edges() -> None:
    manager, _, _ = manager_with(S.ALLOCATED)
    with pytest.raises(SeedStateError, match=r"from ALLOCATED: DORMANT, LOADING\)"):
        manager.transition(1, S.ACTIVE, "skip loading")


@pytest.mark.parametrize("seed", [-1, -3, 3, True, 1.0])
def test_bad_seed_index_is_refused_instead_of_aliasing_another_seed(seed: Any) -> None:
    manager, mirror, layout = manager_with(S.DORMANT)
    with pytest.raises(SeedIndexError, match=r"layer 'enc\.0'"):
        manager.transition(seed, S.ALLOCATED, "x")
    assert mirror == [S.DORMANT] * 3
    assert layout.state.tolist() == [0, 0, 0]


def test_event_carries_a_wall_clock_timestamp() -> None:
    manager, _, _ = manager_with(S.DORMANT)
    before = time.time()
    event = manager.transition(1, S.ALLOCATED, "x")
    assert before <= event.ts <= time.time()


def test_full_cycle_through_the_layer_emits_one_event_per_transition() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="head")
    seen: list[tuple[SeedState, int]] = []
    # Each listener sees the layout and the Python mirror already updated.
    layer.lifecycle.listeners.append(
        lambda e: seen.append((layer.seed_info(e.seed).state, int(layer.layout.state[e.seed])))
    )
    events = recorded(layer)
    attach(layer, 1)
    layer.retire(1, "poor contribution")
    walk = [(e.from_state, e.to_state) for e in events]
    assert walk == [
        (S.DORMANT, S.ALLOCATED),
        (S.ALLOCATED, S.LOADING),
        (S.LOADING, S.ACTIVE),
        (S.ACTIVE, S.RETIRING),
        (S.RETIRING, S.RECYCLING),
        (S.RECYCLING, S.DORMANT),
    ]
    assert [e.seed for e in events] == [1] * 6
    assert [e.kernel_id for e in events] == [None, KID, KID, KID, KID, KID]
    assert events[3].reason == events[4].reason == "poor contribution"
    assert events[5].reason == "slot recycled"
    assert seen == [(e.to_state, int(e.to_state)) for e in events]
    assert layer.seed_info(1).kernel_id is None and layer.seed_module(1) is None


def test_abandoned_allocation_and_failed_load_return_to_dormant_with_a_reason() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="head")
    events = recorded(layer)
    layer.begin_load(0, "germinate")
    layer.fail_load(0, "no kernel for this blueprint")
    layer.begin_load(0, "germinate")
    layer.mark_loading(0, KID)
    layer.fail_load(0, "digest mismatch")
    assert [(e.to_state, e.kernel_id) for e in events] == [
        (S.ALLOCATED, None),
        (S.DORMANT, None),
        (S.ALLOCATED, None),
        (S.LOADING, KID),
        (S.DORMANT, KID),
    ]
    assert events[1].reason == "load failed: no kernel for this blueprint"
    assert events[4].reason == "load failed: digest mismatch"
    assert layer.seed_info(0).state is S.DORMANT and layer.seed_info(0).kernel_id is None


def test_illegal_calls_on_the_layer_change_nothing() -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="head")
    attach(layer, 0)
    events = recorded(layer)
    with pytest.raises(IllegalTransitionError, match="ACTIVE → DORMANT"):
        layer.fail_load(0, "too late")
    with pytest.raises(IllegalTransitionError, match="DORMANT → LOADING"):
        layer.mark_loading(1, KID)
    with pytest.raises(IllegalTransitionError, match="DORMANT → DORMANT"):
        layer.fail_load(1, "nothing to fail")
    info = layer.seed_info(0)
    assert (info.state, info.kernel_id) == (S.ACTIVE, KID)
    assert layer.seed_info(1).kernel_id is None
    assert layer.running_seeds() == (0,)
    assert events == []


def test_a_listener_that_raises_does_not_break_anything(caplog: pytest.LogCaptureFixture) -> None:
    layer = KasminaLayer(nn.Linear(4, 3), 2, name="head")

    def broken(event: LifecycleEvent) -> None:
        raise RuntimeError("listener bug")

    layer.lifecycle.listeners.append(broken)
    events = recorded(layer)  # registered after the broken one: it still hears everything
    x = torch.randn(2, 4)
    with caplog.at_level(logging.ERROR, logger="esper.kasmina.lifecycle"):
        attach(layer, 0, alpha=0.5)
        out = layer(x)
        layer.retire(0, "done")
    assert out.shape == (2, 3)
    assert len(events) == 6
    assert layer.seed_info(0).state is S.DORMANT
    assert sum("lifecycle listener failed" in r.getMessage() for r in caplog.records) == 6


def test_wrap_listeners_hear_every_layer_and_every_transition() -> None:
    model = esper.wrap(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), seeds_per_layer=2
    )
    events: list[LifecycleEvent] = []
    model.add_listener(events.append)
    model.add_listener(lambda e: 1 / 0)  # a broken listener on every layer
    for name in model.layer_names():
        layer = model.layer(name)
        layer.begin_load(1, "test")
        layer.mark_loading(1, KID)
        layer.attach(1, nn.Linear(layer.signature.in_features, layer.signature.out_features))
    model.retire_seed("2", 1, reason="enough")
    assert [(e.layer, e.to_state) for e in events] == [
        ("0", S.ALLOCATED), ("0", S.LOADING), ("0", S.ACTIVE),
        ("2", S.ALLOCATED), ("2", S.LOADING), ("2", S.ACTIVE),
        ("2", S.RETIRING), ("2", S.RECYCLING), ("2", S.DORMANT),
    ]  # fmt: skip
    assert model(torch.randn(5, 4)).shape == (5, 2)

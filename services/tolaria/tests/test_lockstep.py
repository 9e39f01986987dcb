"""tolaria.lockstep between two real processes (torch.distributed, gloo on loopback): gradients
averaged, rank 0's value shared, a flag seen by all, shards disjoint and equal."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from lockstephelpers import run_rank

from esper.testing import free_port
from tolaria.lockstep import shard


def test_two_ranks_agree_on_gradients_decisions_and_flags() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(run_rank, args=(free_port(), results), nprocs=2, join=True)
        got = dict(results)
    zero, one = got[0], got[1]
    # d(sum of outputs)/dW is the input summed over the batch: 4·1 on rank 0, 4·2 on rank 1.
    assert zero["weight_grad"] == one["weight_grad"] == [[6.0] * 3] * 2
    assert zero["extra_grad"] == one["extra_grad"] == [0.5, 0.5]  # (1 + 0) / 2
    assert zero["shared"] == one["shared"] == {"decisions": ["d-1"], "rank": 0}
    assert zero["any"] is one["any"] is True and zero["none"] is one["none"] is False
    assert zero["mean"] == one["mean"] == 0.5
    assert zero["gathered"] == one["gathered"] == [0, 10]
    assert zero["digest"] == one["digest"]


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard(order, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    seen = torch.cat(parts).tolist()
    assert len(set(seen)) == 9 and set(seen) <= set(order.tolist())

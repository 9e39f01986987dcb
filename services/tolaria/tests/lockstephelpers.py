"""A rank of test_lockstep's two-process group (spawned processes import it by name: conftest
puts this directory on the path)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tolaria.lockstep import Lockstep, parameter_digest


def run_rank(rank: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        lockstep = Lockstep()
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        extra = nn.Parameter(torch.zeros(2))  # a seed's parameter: a gradient on rank 0 only
        holder = nn.ModuleDict({"m": model})
        holder.register_parameter("extra", extra)
        x = torch.full((4, 3), float(rank + 1))
        loss = model(x).sum() + (extra.sum() if rank == 0 else 0.0)
        loss.backward()
        lockstep.average_gradients(holder)
        assert extra.grad is not None and model.weight.grad is not None
        results[rank] = {
            "weight_grad": model.weight.grad.tolist(),
            "extra_grad": extra.grad.tolist(),
            "shared": lockstep.share({"decisions": ["d-1"], "rank": rank}),
            "any": lockstep.any(rank == 1),
            "none": lockstep.any(False),
            "mean": lockstep.mean(float(rank)),
            "gathered": lockstep.gather(rank * 10),
            "digest": parameter_digest(holder),
        }
    finally:
        dist.destroy_process_group()

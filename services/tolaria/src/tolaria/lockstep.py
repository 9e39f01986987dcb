"""Growth in lockstep: the ranks of a distributed job (tolaria.rayexec) agree on everything that
changes the model, so they stay one model.

- Every rank builds the same model from the same seed and walks the same permutation of the
  data, each its own shard of it; gradients are averaged over the ranks at every step.
- At a decision point rank 0 alone asks the controller (and takes the operators' decisions);
  it broadcasts what it got, and every rank executes the same decisions at the same step,
  loading the same kernels by id through its own tiered cache.
- A stop asked through the API reaches rank 0; the ranks agree on it every STOP_EVERY steps
  and at every point, and stop at the same step.

Gradients are averaged with one all-reduce of the flattened gradients rather than through
DistributedDataParallel: the set of parameters changes at decision points (a seed's arrive,
a retired seed's leave), which DDP would need rebuilding and unused-parameter tracking for;
one flat all-reduce per step is what DDP does with a single bucket.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
STOP_EVERY = 16
"""Steps between the ranks' agreements on a stop request: a collective per step would cost more
than the step of a small model."""


class Lockstep:
    """The ranks of the default process group (torch.distributed, set up by Ray Train)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def share(self, value: T | None) -> T:
        """Rank 0's `value`, on every rank."""
        box: list[Any] = [value if self.leads else None]
        dist.broadcast_object_list(box, src=0)
        shared: T = box[0]
        return shared

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        boxes: list[Any] = [None] * self.world
        dist.all_gather_object(boxes, value)
        return boxes

    def any(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set."""
        tensor = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def total(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def average_gradients(self, model: nn.Module) -> None:
        """Average every trainable parameter's gradient over the ranks (a parameter without one
        counts as zeros: the ranks hold the same parameters, so the order matches)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in params
        ]
        flat = torch.cat(grads)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            chunk = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch's permutation: every `world`-th sample, the remainder left
    out so that every rank takes the same number of steps."""
    usable = len(order) - len(order) % world
    return order[rank:usable:world]


def parameter_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer, in order: equal on two ranks iff they hold the
    same model."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

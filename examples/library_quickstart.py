"""esper-core in one page: compile a kernel, hot-load it into a seed slot, blend it, train it.

.venv/bin/python examples/library_quickstart.py
"""

from __future__ import annotations

import asyncio

import torch
from torch import nn

import esper


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.layer2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.act(self.layer1(x)))


def main() -> None:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    input_tensor = x[:8]

    # A LoRA-style kernel for layer1's geometry, published under a name in the default registry.
    esper.default_registry().compile("low_rank", model.layer1, tags=["efficiency_kernel_v1"])

    morphable = esper.wrap(model, seeds_per_layer=4)

    async def adapt() -> torch.Tensor:
        await morphable.load_kernel("layer1", seed_idx=0, kernel_id="efficiency_kernel_v1")
        morphable.set_seed_alpha("layer1", seed_idx=0, alpha=0.7)
        return morphable(input_tensor)

    output = asyncio.run(adapt())
    print(f"output shape: {tuple(output.shape)}")

    # Train: host parameters in the first group; the seed joins in its own group.
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)
    morphable.attach_optimizer(optimizer, lr=5e-3, max_grad_norm=1.0)
    for step in range(5):
        loss = nn.functional.mse_loss(morphable(x), y)
        optimizer.zero_grad()
        loss.backward()
        morphable.clip_seed_gradients()
        optimizer.step()
        morphable.step()
        print(f"step {step} loss {loss.item():.4f}")

    for seed in morphable.seeds("layer1"):
        print(
            f"seed {seed.layer}:{seed.seed} {seed.state.name} alpha={seed.alpha} {seed.kernel_id}"
        )


if __name__ == "__main__":
    main()

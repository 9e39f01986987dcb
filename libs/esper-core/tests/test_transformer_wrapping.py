"""esper.wrap on transformer models: the Linear layers a block calls grow; attention's out_proj,
whose weights nn.MultiheadAttention reads directly, is left alone; seeds run in eval mode too."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.exceptions import ConfigError, UnsupportedHostError
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.state import SeedState

FUSED_OP = "aten::_transformer_encoder_layer_fwd"
ENCODER_LAYERS = [f"encoder.layers.{i}.{name}" for i in (0, 1) for name in ("linear1", "linear2")]


class EncoderClassifier(nn.Module):
    """Input projection → 2 TransformerEncoderLayers → mean pool → Linear head."""

    def __init__(self, features: int = 4, d_model: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(features, d_model)
        # No dropout: a train-mode forward is then the same function as an eval-mode one.
        block = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, num_layers=2)
        self.head = nn.Linear(d_model, classes)

    def encode(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.proj(x), src_key_padding_mask=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x).mean(dim=1))


class SequentialMLPBlock(nn.Module):
    """A pre-norm transformer block whose MLP is an nn.Sequential: widenable."""

    def __init__(self, d_model: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class BlockClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 16)
        self.block = SequentialMLPBlock()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.proj(x)).mean(dim=1))


def encoder_classifier() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier()


def sign_task(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 8 random 4-vectors; the label is the sign of the sum of feature 0."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, 4, generator=g)
    return x, (x[:, :, 0].sum(dim=1) > 0).long()


def fused_calls(fn: Callable[[], object]) -> int:
    """How many times `fn` ran torch's fused encoder-layer kernel (which skips module calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == FUSED_OP)


@pytest.fixture(scope="module")
def registry() -> esper.LocalKernelRegistry:
    """low_rank for a feed-forward linear1 (16 → 32); widen for the block's 16 → 32 → 16 MLP."""
    registry = esper.LocalKernelRegistry()
    registry.compile("low_rank", nn.Linear(16, 32), tags=["ff_low_rank"])
    pair = esper.HostSignature.of(nn.Linear(16, 32)).widening(
        esper.HostSignature.of(nn.Linear(32, 16))
    )
    registry.compile("widen", pair, tags=["mlp_widen"])
    return registry


def set_seed_fan_out(morphable: esper.MorphableModel, layer: str) -> None:
    """Give a function-preserving seed (last layer at zero) a nonzero output."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in morphable.seed_parameters(layer):
            p.normal_(0.0, 0.5)


# ------------------------------------------------------------------------ which layers
def test_wrap_takes_the_linear_layers_a_block_calls_and_leaves_out_proj() -> None:
    model = encoder_classifier()
    morphable = esper.wrap(model, seeds_per_layer=2)
    assert sorted(morphable.layer_names()) == sorted(["proj", "head", *ENCODER_LAYERS])
    for i in (0, 1):
        out_proj = model.encoder.layers[i].self_attn.out_proj
        assert isinstance(out_proj, nn.Linear) and not isinstance(out_proj, KasminaLayer)
        # No nn.Sequential, dropout in between: the feed-forward pair cannot be widened.
        assert morphable.layer(f"encoder.layers.{i}.linear1").next_layer is None
    x, _ = sign_task(4)
    assert morphable(x).shape == (4, 2)


def test_naming_an_attention_out_proj_says_why_it_cannot_be_wrapped() -> None:
    with pytest.raises(UnsupportedHostError, match="never called as a module"):
        esper.wrap(encoder_classifier(), layers=["encoder.layers.0.self_attn.out_proj"])
    # Attention alone has no Linear layer that is called: nothing to wrap.
    with pytest.raises(ConfigError, match="layer to wrap"):
        esper.wrap(nn.Sequential(nn.MultiheadAttention(16, 2)))


# ----------------------------------------------------------------- eval-mode fast path
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the unwrapped model's
async def test_seeds_run_in_eval_mode_instead_of_the_fused_path(
    registry: esper.LocalKernelRegistry,
) -> None:
    plain = encoder_classifier().eval()
    inner = copy.deepcopy(plain)
    morphable = esper.wrap(inner, kernels=esper.KernelCache([registry]))
    morphable.eval()
    x, _ = sign_task(16)
    padding = torch.zeros(16, 8, dtype=torch.bool)
    padding[:4, 6:] = True  # a padded batch: TransformerEncoder would pack it as nested

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    assert fused_calls(lambda: run(plain)) == 2  # the unwrapped model does take the fused path
    assert fused_calls(lambda: run(morphable)) == 0

    await morphable.load_kernel("encoder.layers.0.linear1", 0, "ff_low_rank", alpha=0.0)
    torch.testing.assert_close(run(morphable), run(plain))
    with torch.no_grad():
        kept = ~padding
        wrapped_h = inner.encode(x, padding)[kept]
        torch.testing.assert_close(wrapped_h, plain.encode(x, padding)[kept])

    set_seed_fan_out(morphable, "encoder.layers.0.linear1")
    morphable.set_seed_alpha("encoder.layers.0.linear1", 0, 1.0)
    seeded = run(morphable)
    assert (seeded - run(plain)).abs().max() > 1e-3  # the seed runs in eval + no_grad
    torch.testing.assert_close(seeded, morphable(x).detach())  # eval, grad on: module path
    morphable.train()
    torch.testing.assert_close(seeded, morphable(x).detach())  # train mode (no dropout)


# --------------------------------------------------------------- training a seed
async def test_a_low_rank_seed_in_a_feed_forward_layer_trains_and_checkpoints(
    registry: esper.LocalKernelRegistry,
) -> None:
    kernels = esper.KernelCache([registry])
    x, y = sign_task()
    morphable = esper.wrap(encoder_classifier(), seeds_per_layer=2, kernels=kernels)
    layer = "encoder.layers.0.linear1"
    info = await morphable.load_kernel(layer, 0, "ff_low_rank", blend="add")
    assert info.state is SeedState.ACTIVE
    optimizer = torch.optim.Adam(morphable.host_parameters(), lr=1e-2)
    morphable.attach_optimizer(optimizer, lr=1e-2, max_grad_norm=1.0)
    assert any(g.get("name") == f"seed:{layer}:0" for g in optimizer.param_groups)
    morphable.ramp_seed_alpha(layer, 0, 1.0, steps=5)
    seed_before = [p.detach().clone() for p in morphable.seed_parameters(layer)]

    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(morphable(x), y)
        optimizer.zero_grad()
        loss.backward()
        morphable.clip_seed_gradients()
        optimizer.step()
        morphable.step()
        losses.append(loss.item())

    assert losses[-1] < 0.7 * losses[0], losses
    assert morphable.seeds(layer)[0].alpha == 1.0
    seed_after = morphable.seed_parameters(layer)
    assert all(not torch.equal(a, b) for a, b in zip(seed_before, seed_after, strict=True))

    restored = esper.wrap(encoder_classifier(), seeds_per_layer=2, kernels=kernels)
    restored.load_state_dict(morphable.state_dict())
    assert restored.seeds(layer)[0].state is SeedState.ACTIVE
    morphable.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), morphable(x))


# ------------------------------------------------------ widening a Sequential MLP
async def test_a_block_whose_mlp_is_sequential_can_be_widened(
    registry: esper.LocalKernelRegistry,
) -> None:
    torch.manual_seed(0)
    kernels = esper.KernelCache([registry])
    morphable = esper.wrap(BlockClassifier(), seeds_per_layer=2, kernels=kernels)
    assert sorted(morphable.layer_names()) == ["block.mlp.0", "block.mlp.2", "head", "proj"]
    assert morphable.layer("block.mlp.0").next_layer == "block.mlp.2"
    x, _ = sign_task(16)
    before = morphable(x).detach()

    info = await morphable.load_kernel("block.mlp.0", 0, "mlp_widen", alpha=1.0)
    assert info.widens and info.state is SeedState.ACTIVE
    torch.testing.assert_close(morphable(x), before)  # born with its fan-out at zero

    set_seed_fan_out(morphable, "block.mlp.0")
    widened = morphable(x)
    assert (widened - before).abs().max() > 1e-3
    widened.sum().backward()
    grads = [p.grad for p in morphable.seed_parameters("block.mlp.0")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    torch.manual_seed(0)
    restored = esper.wrap(BlockClassifier(), seeds_per_layer=2, kernels=kernels)
    restored.load_state_dict(morphable.state_dict())
    assert restored.layer("block.mlp.0").seed_info(0).widens
    morphable.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), morphable(x))

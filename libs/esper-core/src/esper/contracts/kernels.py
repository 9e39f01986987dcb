"""What travels on the wire about a kernel: the host geometry it fits (`HostSignature`) and what
a registry knows about it (`KernelMeta`). Urza serves them, `event.kernel_ready` and the compile
API carry them, and caches store them, so they are contracts; the artifact bytes, their signing
and the executor stay in `esper.kernels`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from esper.contracts.vocabulary import KERNEL_ID_RE, Blend, KernelFormat
from esper.exceptions import UnsupportedHostError

if TYPE_CHECKING:  # torch is imported where a module is inspected: contracts need no torch
    from torch import nn

Pair = tuple[int, int]
MAX_HOST_FEATURES = 1 << 20
# Far above any real convolution, low enough that the inputs a compile or a probe makes for the
# host (at least the dilated kernel's span on each side) stay small.
MAX_KERNEL_SIZE = 64
MAX_STRIDE = 64
MAX_DILATION = 64
MAX_PADDING = 1024
_PAIR_LIMITS = {"kernel_size": MAX_KERNEL_SIZE, "stride": MAX_STRIDE, "dilation": MAX_DILATION}


def _pair(value: int | tuple[int, ...]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _padding(padding: str | int | tuple[int, ...]) -> Pair | Literal["same"]:
    if isinstance(padding, str):
        return "same" if padding == "same" else (0, 0)  # "valid"
    return _pair(padding)


class HostSignature(BaseModel):
    """A Linear host maps [..., in_features] → [..., out_features]; a Conv2d host maps
    [B, in_features, H, W] → [B, out_features, H', W'] with its kernel/stride/padding/dilation.
    A Conv1d host maps [B, in_features, L] → [B, out_features, L']: a conv over a height-1 map,
    so its geometry is the same pairs with a first element of 1 (padding 0): kernel_size
    (1, k), stride (1, s), padding (0, p) or "same", dilation (1, d).

    A *widening* host also names its `downstream` layer, the next one, of the same kind, that
    reads this layer's output through an elementwise activation. A seed for it reads this
    layer's input and adds to the downstream layer's output: k new hidden units (channels)
    between the two layers. Its kernels map this layer's input shape to the downstream layer's
    output shape (`input_shape`, `output_shape`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["linear", "conv2d", "conv1d"]
    in_features: int = Field(ge=1, le=MAX_HOST_FEATURES)
    out_features: int = Field(ge=1, le=MAX_HOST_FEATURES)
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair | Literal["same"] = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = Field(default=1, ge=1)
    downstream: HostSignature | None = None

    @model_validator(mode="after")
    def _check(self) -> HostSignature:
        if self.downstream is not None:
            d = self.downstream
            if d.downstream is not None:
                raise ValueError("a downstream layer cannot name a downstream of its own")
            if d.kind != self.kind:
                raise ValueError(f"downstream is a {d.kind} layer, this one a {self.kind}")
            if d.in_features != self.out_features:
                raise ValueError(
                    f"downstream reads {d.in_features} features, this layer gives "
                    f"{self.out_features}"
                )
        for name, limit in _PAIR_LIMITS.items():
            if min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
            if max(getattr(self, name)) > limit:
                raise ValueError(f"{name} must be ≤ {limit}, got {getattr(self, name)}")
        if self.padding != "same" and min(self.padding) < 0:
            raise ValueError(f"padding must be ≥ 0, got {self.padding}")
        if self.padding != "same" and max(self.padding) > MAX_PADDING:
            raise ValueError(f"padding must be ≤ {MAX_PADDING}, got {self.padding}")
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' needs stride (1, 1)")
        if self.in_features % self.groups or self.out_features % self.groups:
            raise ValueError(f"groups={self.groups} must divide in and out features")
        if self.kind == "conv1d":
            self._check_conv1d()
        return self

    def _check_conv1d(self) -> None:
        firsts = {name: getattr(self, name)[0] for name in _PAIR_LIMITS}
        if any(first != 1 for first in firsts.values()):
            raise ValueError(
                "a conv1d host's kernel_size, stride and dilation are (1, k), (1, s), (1, d); "
                f"got first elements {firsts}"
            )
        if self.padding != "same" and self.padding[0] != 0:
            raise ValueError(f"a conv1d host's padding is (0, p) or 'same', got {self.padding}")

    @classmethod
    def of(cls, module: nn.Module) -> HostSignature:
        from torch import nn
        from torch.nn.modules.lazy import LazyModuleMixin

        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise UnsupportedHostError(
                f"cannot wrap an uninitialized {type(module).__name__}: its sizes are unknown "
                "until its first forward; run one batch through the model before wrapping it"
            )
        if isinstance(module, nn.Linear):
            return cls(
                kind="linear", in_features=module.in_features, out_features=module.out_features
            )
        if isinstance(module, nn.Conv2d):
            return cls(
                kind="conv2d",
                in_features=module.in_channels,
                out_features=module.out_channels,
                kernel_size=_pair(module.kernel_size),
                stride=_pair(module.stride),
                padding=_padding(module.padding),
                dilation=_pair(module.dilation),
                groups=module.groups,
            )
        if isinstance(module, nn.Conv1d):
            # Conv1d's tuples have one element: pad it to the (1, k)-style pair of a conv1d.
            padding = _padding(
                module.padding if isinstance(module.padding, str) else (0, *module.padding)
            )
            return cls(
                kind="conv1d",
                in_features=module.in_channels,
                out_features=module.out_channels,
                kernel_size=(1, module.kernel_size[0]),
                stride=(1, module.stride[0]),
                padding=padding,
                dilation=(1, module.dilation[0]),
                groups=module.groups,
            )
        raise UnsupportedHostError(
            f"cannot wrap {type(module).__name__}: Kasmina hosts are nn.Linear, nn.Conv1d and "
            "nn.Conv2d"
        )

    def widening(self, downstream: HostSignature) -> HostSignature:
        """This layer's signature as a widening host into `downstream` (see the class)."""
        return self.model_copy(update={"downstream": downstream.model_copy(update={})})

    @property
    def layer(self) -> HostSignature:
        """The host layer's own signature, without its downstream."""
        return self if self.downstream is None else self.model_copy(update={"downstream": None})

    @property
    def seed_out_features(self) -> int:
        """The width of a seed's output: the downstream layer's for a widening host."""
        return self.out_features if self.downstream is None else self.downstream.out_features

    def reference_module(self) -> nn.Module:
        """A fresh layer of this geometry, for checking a kernel where the real host is absent
        (Urza probes an uploaded kernel against one); for a widening host, the two layers."""
        from torch import nn

        if self.downstream is not None:
            return nn.Sequential(self.layer.reference_module(), self.downstream.reference_module())
        if self.kind == "linear":
            return nn.Linear(self.in_features, self.out_features)
        if self.kind == "conv1d":
            return nn.Conv1d(
                self.in_features,
                self.out_features,
                self.kernel_size[1],
                self.stride[1],
                self.padding if self.padding == "same" else self.padding[1],
                self.dilation[1],
                self.groups,
            )
        return nn.Conv2d(
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def input_shape(self, batch: int, hw: Pair | None = None) -> tuple[int, ...]:
        """A small input shape for this host; conv inputs are large enough for its kernel. A
        conv1d input is [batch, C, L] with L = `hw[1]` (its geometry's second elements)."""
        if self.kind == "linear":
            return (batch, self.in_features)
        if hw is None:
            hw = (self.min_extent(0), self.min_extent(1))
        if self.kind == "conv1d":
            return (batch, self.in_features, hw[1])
        return (batch, self.in_features, *hw)

    def min_extent(self, dim: int) -> int:
        """The smallest input extent along `dim` this host (and its downstream) can take."""
        span = self.dilation[dim] * (self.kernel_size[dim] - 1) + 1
        if self.downstream is None:
            return max(8, span)
        # Enough input that this layer's output covers the downstream layer's own minimum.
        need = self.downstream.min_extent(dim)
        return max(8, span + (need - 1) * self.stride[dim] - 2 * self._pad(dim))

    def _pad(self, dim: int) -> int:
        return 0 if self.padding == "same" else self.padding[dim]

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.downstream is not None:
            return self.downstream.output_shape(self.layer.output_shape(input_shape))
        if self.kind == "linear":
            return (*input_shape[:-1], self.out_features)
        if self.kind == "conv1d":
            batch, _, length = input_shape
            return (batch, self.out_features, self._out_extent(1, length))
        batch, _, h, w = input_shape
        return (batch, self.out_features, self._out_extent(0, h), self._out_extent(1, w))

    def _out_extent(self, dim: int, size: int) -> int:
        if self.padding == "same":
            return size
        span = self.dilation[dim] * (self.kernel_size[dim] - 1) + 1
        return (size + 2 * self.padding[dim] - span) // self.stride[dim] + 1


class KernelMeta(BaseModel):
    """What a registry knows about a kernel; `digest` and `hmac_sha256` vouch for its bytes."""

    model_config = ConfigDict(extra="forbid")

    kernel_id: str = Field(pattern=KERNEL_ID_RE.pattern)
    name: str
    format: KernelFormat
    host: HostSignature
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    hmac_sha256: str | None = None
    vouched_by: Literal["compiler", "admin"] | None = None
    """Who vouches for the code this artifact runs while it loads (TorchScript's `__setstate__`,
    which cannot be inspected first): the blueprint compiler that made it, or an Urza uploader
    holding the admin token. None: accepted on inspection alone. The signature covers it."""
    blueprint: str | None = None
    blueprint_version: int | None = None
    default_blend: Blend = "add"
    params: int = 0
    flops: int = 0
    latency_us: float = 0.0
    created_at: float = Field(default_factory=time.time)
    lineage: dict[str, Any] = Field(default_factory=dict)

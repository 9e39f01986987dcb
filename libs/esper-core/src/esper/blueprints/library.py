"""The built-in blueprints. Each is plain data; `BUILTIN_BLUEPRINTS` validates them at import."""

from __future__ import annotations

from typing import Any

from esper.blueprints.spec import BlueprintSpec
from esper.exceptions import UnknownBlueprintError

# Version 2 of a built-in is version 1 that serves conv1d hosts too: a store holding version 1
# keeps it, and a changed spec under the same version would refuse Urza's start-up on it.
_SPECS: list[dict[str, Any]] = [
    {
        "name": "low_rank",
        "version": 2,
        "description": "LoRA-style rank-r branch: a host-geometry projection to r, then up to out.",
        "hosts": ["linear", "conv2d", "conv1d"],
        "params": {"rank": 8},
        "body": [
            {"op": "host_proj", "out": "rank", "bias": False},
            {"op": "project", "out": "out", "bias": False},
        ],
    },
    {
        "name": "residual_mlp",
        "version": 2,
        "description": "Projection to a hidden width, a residual MLP block, projection to out.",
        "hosts": ["linear", "conv2d", "conv1d"],
        "params": {"ratio": 0.25, "floor": 16},
        "body": [
            {"op": "host_proj", "out": "max(floor, out*ratio)"},
            {"op": "act", "fn": "gelu"},
            {
                "op": "residual",
                "body": [
                    {"op": "norm"},
                    {"op": "project", "out": "max(floor, out*ratio)"},
                    {"op": "act", "fn": "gelu"},
                ],
            },
            {"op": "project", "out": "out"},
        ],
    },
    {
        "name": "bottleneck",
        "version": 2,
        "description": "Squeeze to out/4, normalise and activate, expand back to out.",
        "hosts": ["linear", "conv2d", "conv1d"],
        "params": {"ratio": 0.25},
        "body": [
            {"op": "host_proj", "out": "max(4, out*ratio)"},
            {"op": "norm"},
            {"op": "act", "fn": "relu"},
            {"op": "project", "out": "out"},
        ],
    },
    {
        "name": "conv3x3",
        "version": 2,
        "description": (
            "Host-geometry reduction, a 3x3 conv (3-wide on conv1d hosts) at the output "
            "resolution, GroupNorm, 1x1 up."
        ),
        "hosts": ["conv2d", "conv1d"],
        "params": {"ratio": 0.5},
        "body": [
            {"op": "host_proj", "out": "max(8, out*ratio)", "bias": False},
            {"op": "act", "fn": "relu"},
            {"op": "conv", "out": "max(8, out*ratio)", "kernel": 3, "bias": False},
            {"op": "norm"},
            {"op": "act", "fn": "relu"},
            {"op": "project", "out": "out"},
        ],
    },
    {
        "name": "depthwise_separable",
        "version": 2,
        "description": "Depthwise conv with the host's geometry, then a pointwise conv to out.",
        "hosts": ["conv2d", "conv1d"],
        "body": [
            {"op": "depthwise", "kernel": "host", "bias": False},
            {"op": "norm"},
            {"op": "act", "fn": "silu"},
            {"op": "project", "out": "out"},
        ],
    },
    {
        "name": "squeeze_excite",
        "version": 2,
        "description": (
            "Channel attention on the input (squeeze-excitation), then the host-geometry map."
        ),
        "hosts": ["linear", "conv2d", "conv1d"],
        "body": [
            {"op": "squeeze_excite", "ratio": 0.25},
            {"op": "host_proj", "out": "out"},
        ],
    },
    {
        "name": "gated_linear_unit",
        "version": 2,
        "description": "A GLU (a ⊙ σ(b)) to a hidden width, then a projection to out.",
        "hosts": ["linear", "conv2d", "conv1d"],
        "params": {"ratio": 0.5},
        "body": [
            {"op": "glu", "out": "max(8, out*ratio)"},
            {"op": "host_proj", "out": "out"},
        ],
    },
    {
        "name": "norm_scale",
        "version": 2,
        "description": "Host-geometry map, normalised, times a per-channel scale that starts at 0.",
        "hosts": ["linear", "conv2d", "conv1d"],
        "body": [
            {"op": "host_proj", "out": "out", "bias": False},
            {"op": "norm"},
            {"op": "scale", "init": 0.0},
        ],
    },
    {
        "name": "wide_mlp",
        "description": (
            "A two-layer MLP branch twice the host's width: capacity for underfitting hosts."
        ),
        "hosts": ["linear"],
        "params": {"ratio": 2.0},
        "body": [
            {"op": "host_proj", "out": "max(16, in*ratio)"},
            {"op": "act", "fn": "relu"},
            {"op": "project", "out": "out"},
        ],
    },
    {
        "name": "widen",
        "version": 2,
        "description": (
            "k = max(4, mid·ratio) new hidden units between this layer and the next (ratio 0.5)"
        ),
        "hosts": ["linear", "conv2d", "conv1d"],
        "widens": True,
        "params": {"ratio": 0.5},
        "body": [
            {"op": "host_proj", "out": "max(4, mid*ratio)"},
            {"op": "act", "fn": "relu"},
            {"op": "next_proj", "out": "out"},
        ],
    },
]

BUILTIN_BLUEPRINTS: dict[str, BlueprintSpec] = {
    spec.name: spec for spec in (BlueprintSpec.parse(data) for data in _SPECS)
}


def get_blueprint(name: str) -> BlueprintSpec:
    try:
        return BUILTIN_BLUEPRINTS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_BLUEPRINTS))
        raise UnknownBlueprintError(f"unknown blueprint {name!r}; built-in: {known}") from None

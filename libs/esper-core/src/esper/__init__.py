"""Esper: neural networks that grow capacity while they train.

import esper
morphable = esper.wrap(model, seeds_per_layer=4)
await morphable.load_kernel("layer1", seed_idx=0, kernel_id="efficiency_kernel_v1")
morphable.set_seed_alpha("layer1", seed_idx=0, alpha=0.7)
"""

from esper import exceptions
from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, compile_blueprint, get_blueprint
from esper.exceptions import EsperError
from esper.kasmina import (
    AlphaRamp,
    BlendMode,
    KasminaLayer,
    LifecycleEvent,
    SeedInfo,
    SeedState,
    StateLayout,
)
from esper.kernels import KernelArtifact, KernelCache, KernelExecutor, KernelMeta, KernelSource
from esper.morphable import MorphableModel, wrap
from esper.registry import LocalKernelRegistry, default_registry
from esper.signature import HostSignature

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_BLUEPRINTS",
    "AlphaRamp",
    "BlendMode",
    "BlueprintSpec",
    "EsperError",
    "HostSignature",
    "KasminaLayer",
    "KernelArtifact",
    "KernelCache",
    "KernelExecutor",
    "KernelMeta",
    "KernelSource",
    "LifecycleEvent",
    "LocalKernelRegistry",
    "MorphableModel",
    "SeedInfo",
    "SeedState",
    "StateLayout",
    "__version__",
    "compile_blueprint",
    "default_registry",
    "exceptions",
    "get_blueprint",
    "wrap",
]

"""Esper: neural networks that grow capacity while they train.

import esper
morphable = esper.wrap(model, seeds_per_layer=4)
await morphable.load_kernel("layer1", seed_idx=0, kernel_id="efficiency_kernel_v1")
morphable.set_seed_alpha("layer1", seed_idx=0, alpha=0.7)

or, growth decided for you in your own training loop: `with esper.session(model, optimizer,
name=..., evaluate=...) as run:` (esper.sessions).
"""

from typing import TYPE_CHECKING

from esper import exceptions
from esper._lazy import lazy_exports
from esper.exceptions import EsperError

if TYPE_CHECKING:
    from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, compile_blueprint, get_blueprint
    from esper.contracts.kernels import HostSignature, KernelMeta
    from esper.kasmina import (
        AlphaRamp,
        BlendMode,
        KasminaLayer,
        LifecycleEvent,
        SeedInfo,
        SeedState,
        StateLayout,
    )
    from esper.kernels import KernelArtifact, KernelCache, KernelExecutor, KernelSource
    from esper.morphable import MorphableModel, wrap
    from esper.registry import LocalKernelRegistry, default_registry
    from esper.sessions import session

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
    "session",
    "wrap",
]

_WHERE = {
    "BUILTIN_BLUEPRINTS": "esper.blueprints",
    "BlueprintSpec": "esper.blueprints",
    "compile_blueprint": "esper.blueprints",
    "get_blueprint": "esper.blueprints",
    "AlphaRamp": "esper.kasmina",
    "BlendMode": "esper.kasmina",
    "KasminaLayer": "esper.kasmina",
    "LifecycleEvent": "esper.kasmina",
    "SeedInfo": "esper.kasmina",
    "SeedState": "esper.kasmina",
    "StateLayout": "esper.kasmina",
    "KernelArtifact": "esper.kernels",
    "KernelCache": "esper.kernels",
    "KernelExecutor": "esper.kernels",
    "KernelMeta": "esper.contracts.kernels",
    "KernelSource": "esper.kernels",
    "MorphableModel": "esper.morphable",
    "wrap": "esper.morphable",
    "LocalKernelRegistry": "esper.registry",
    "default_registry": "esper.registry",
    "HostSignature": "esper.contracts.kernels",
    "session": "esper.sessions",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

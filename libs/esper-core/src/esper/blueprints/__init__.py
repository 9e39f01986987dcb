"""Blueprints: small networks described as data, compiled into kernels for a host signature."""

from typing import TYPE_CHECKING

from esper._lazy import lazy_exports

if TYPE_CHECKING:
    from esper.blueprints.builder import instantiate
    from esper.blueprints.compiler import COMPILER_VERSION, compile_blueprint, compile_kernel_id
    from esper.blueprints.library import BUILTIN_BLUEPRINTS, get_blueprint
    from esper.blueprints.spec import BlueprintSpec

__all__ = [
    "BUILTIN_BLUEPRINTS",
    "COMPILER_VERSION",
    "BlueprintSpec",
    "compile_blueprint",
    "compile_kernel_id",
    "get_blueprint",
    "instantiate",
]

_WHERE = {
    "instantiate": "esper.blueprints.builder",
    "COMPILER_VERSION": "esper.blueprints.compiler",
    "compile_blueprint": "esper.blueprints.compiler",
    "compile_kernel_id": "esper.blueprints.compiler",
    "BUILTIN_BLUEPRINTS": "esper.blueprints.library",
    "get_blueprint": "esper.blueprints.library",
    "BlueprintSpec": "esper.blueprints.spec",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
"""Lazy like `esper.kasmina`: the catalogue (specs, library) needs no torch, and Tamiyo and Nissa
read it without ever building a module; the builder and compiler load torch when first used."""

"""Blueprints: small networks described as data, compiled into kernels for a host signature."""

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

"""Lazy re-exports: `import esper` (or `esper.kernels`) must not load torch for a process that
only speaks the contracts and the bus (the CLI, Tamiyo, Nissa): torch takes ~1.5 s to import.
A name is imported from its module the first time it is used (PEP 562). So is a subpackage used
as an attribute (`esper.blueprints.instantiate`): before the lazy exports, importing `esper`
imported every subpackage, and code written then relies on it."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, importing `name` from `where[name]`."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
                return importlib.import_module(f"{package}.{name}")  # binds it on the package
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__

"""The public surface of `import esper`: pinned, so that a change to it is a decision."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

import esper
import esper.exceptions

PUBLIC_API = [
    "AlphaRamp",
    "BUILTIN_BLUEPRINTS",
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

# What each exception is besides an EsperError, as the module docstring promises.
STDLIB_BASES = {
    "ConfigError": ValueError,
    "UnknownLayerError": LookupError,
    "UnsupportedHostError": TypeError,
    "SeedIndexError": IndexError,
    "AlphaError": ValueError,
    "AlphaRangeError": ValueError,
    "LerpBudgetError": ValueError,
    "BlueprintSpecError": ValueError,
    "UnknownBlueprintError": LookupError,
    "UnknownKernelError": LookupError,
}


def exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(esper.exceptions).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == "esper.exceptions"
    }


def test_all_is_pinned() -> None:
    assert sorted(PUBLIC_API) == PUBLIC_API
    assert sorted(esper.__all__) == PUBLIC_API
    assert len(set(esper.__all__)) == len(esper.__all__)


@pytest.mark.parametrize("name", PUBLIC_API)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("esper")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from esper import {name}", namespace)
    assert namespace[name] is getattr(esper, name)


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from esper import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_API


def test_version_matches_the_distribution() -> None:
    assert esper.__version__ == importlib.metadata.version("esper-core")


def test_package_is_typed() -> None:
    assert (Path(esper.__file__).parent / "py.typed").is_file()


def test_every_exception_derives_from_esper_error() -> None:
    classes = exception_classes()
    assert len(classes) >= 20
    for name, cls in classes.items():
        assert issubclass(cls, esper.EsperError), name
    assert esper.EsperError is esper.exceptions.EsperError
    assert issubclass(esper.EsperError, Exception)


@pytest.mark.parametrize("name", sorted(STDLIB_BASES))
def test_exceptions_are_also_the_builtin_they_mean(name: str) -> None:
    assert issubclass(exception_classes()[name], STDLIB_BASES[name])


def test_exception_tree_in_the_docstring_matches_the_classes() -> None:
    """The tree drawn in esper.exceptions' docstring is the real hierarchy, and complete."""
    doc = esper.exceptions.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        found = re.match(r"^(\s*(?:[│├└─ ]\s*)*)([A-Z]\w+Error)\b", line)
        if not found:
            continue
        depth, name = len(found.group(1)), found.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    classes = exception_classes()
    assert set(parents) | {"EsperError"} == set(classes)
    for name, parent in parents.items():
        esper_bases = [b for b in classes[name].__bases__ if b.__module__ == "esper.exceptions"]
        assert [b.__name__ for b in esper_bases] == [parent], name


def test_submodule_exports_resolve() -> None:
    for module_name in ("esper.kasmina", "esper.kernels", "esper.blueprints"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module_name}.{name}"


@pytest.mark.parametrize(
    "module",
    ["esper", "esper.contracts", "esper.bus", "esper.client", "esper.cli", "esper.blueprints"],
)
def test_importing_the_contracts_bus_client_cli_or_blueprints_does_not_load_torch(
    module: str,
) -> None:
    """A process that only speaks contracts and the bus (the CLI, Tamiyo, Nissa) must not pay
    torch's import time (~1.5 s): `import esper` re-exports lazily, and so does
    `esper.blueprints`, whose catalogue Tamiyo reads."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_subpackages_are_reachable_as_attributes_after_a_bare_import() -> None:
    """`import esper` imports no subpackage eagerly, yet `esper.blueprints.x` must work as it
    did when it did (found by bench_kasmina, which uses esper.blueprints.instantiate)."""
    import subprocess
    import sys

    code = (
        "import esper; print(callable(esper.blueprints.instantiate), "
        "esper.kernels.__name__, hasattr(esper, 'no_such_subpackage'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "esper.kernels", "False"]


def test_lazy_names_resolve_to_the_real_objects() -> None:
    from esper.morphable import wrap

    assert esper.wrap is wrap
    assert "wrap" in dir(esper)
    with pytest.raises(AttributeError):
        _ = esper.no_such_name  # type: ignore[attr-defined]

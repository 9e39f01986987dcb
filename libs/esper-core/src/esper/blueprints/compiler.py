"""Blueprint + host signature → a validated, measured kernel artifact."""

from __future__ import annotations

import statistics
import time
from typing import get_args

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints.builder import host_for, instantiate
from esper.blueprints.library import get_blueprint
from esper.blueprints.spec import BlueprintSpec
from esper.contracts.kernels import HostSignature, KernelMeta
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import BlueprintHostError, CompileError, EsperError
from esper.kernels.artifact import KernelArtifact, digest_of, kernel_id_for
from esper.kernels.executor import (
    deserialize,
    example_input,
    export_program,
    probe_input,
    program_module,
    save_program,
    serialize,
)

COMPILER_VERSION = 1
LATENCY_RUNS = 15


def compile_kernel_id(spec: BlueprintSpec, host: HostSignature, fmt: KernelFormat) -> str:
    """The id of what `compile_blueprint(spec, host, fmt)` makes (see `host_for`)."""
    host = host_for(spec, host)
    # Without `downstream` for a plain host: plain kernels keep the ids they had before it.
    exclude = {"downstream"} if host.downstream is None else set()
    return kernel_id_for(
        {
            "compiler": COMPILER_VERSION,
            "torch": torch.__version__.split("+")[0],
            "blueprint": spec.canonical(),
            "host": host.model_dump(mode="json", exclude=exclude),
            "format": fmt,
        }
    )


def compile_blueprint(
    blueprint: BlueprintSpec | str,
    host: HostSignature | nn.Module,
    fmt: KernelFormat = "export",
    *,
    signing_key: bytes | None = None,
) -> KernelArtifact:
    """Instantiate, initialise function-preserving, export and serialize, validate, measure."""
    spec = get_blueprint(blueprint) if isinstance(blueprint, str) else blueprint
    if spec.widens and not isinstance(host, HostSignature):
        raise BlueprintHostError(
            f"blueprint {spec.name!r} widens a layer into the next one, which a module does not "
            "name: pass HostSignature.of(layer).widening(HostSignature.of(next_layer))"
        )
    signature = host_for(spec, host if isinstance(host, HostSignature) else HostSignature.of(host))
    if fmt not in get_args(KernelFormat):
        raise CompileError(f"unknown kernel format {fmt!r}; use 'export' or 'torchscript'")
    kernel_id = compile_kernel_id(spec, signature, fmt)
    where = _where(spec, signature)
    module, example = _instantiate_checked(spec, signature, seed=int(kernel_id[4:12], 16))

    program: torch.export.ExportedProgram | None = None
    try:
        if fmt == "export":
            program = export_program(module, signature)
            data = save_program(program)
        else:
            data = serialize(module, signature, fmt)
    except EsperError:
        raise
    except Exception as err:
        raise CompileError(
            f"{where}: {fmt} failed: {type(err).__name__}: {str(err)[:300]}"
        ) from None

    meta = KernelMeta(
        kernel_id=kernel_id,
        name=spec.name,
        format=fmt,
        host=signature,
        digest=digest_of(data),
        size_bytes=len(data),
        blueprint=spec.name,
        blueprint_version=spec.version,
        default_blend=spec.default_blend,
        vouched_by="compiler",  # these bytes are this compiler's own output, never an upload's
        params=sum(p.numel() for p in module.parameters()),
        flops=_flops_per_sample(module, example),
    )
    artifact = KernelArtifact(meta, data)
    meta.latency_us = _validate_and_time(artifact, signature, where, program)
    return artifact.signed(signing_key) if signing_key else artifact


def dry_run(spec: BlueprintSpec, host: HostSignature) -> None:
    """The checks of a compile without the export: the blueprint instantiates for `host`, gives
    the host's output shape and is function-preserving. Raises what `compile_blueprint` would."""
    _instantiate_checked(spec, host, seed=0)


def _where(spec: BlueprintSpec, host: HostSignature) -> str:
    then = "" if host.downstream is None else f"→{host.downstream.out_features}"
    return f"blueprint {spec.name!r} for {host.kind} {host.in_features}→{host.out_features}{then}"


def _instantiate_checked(
    spec: BlueprintSpec, host: HostSignature, seed: int
) -> tuple[nn.Module, torch.Tensor]:
    where = _where(spec, host)
    module = instantiate(spec, host, seed=seed)
    example = example_input(host)
    expected_shape = host.output_shape(tuple(example.shape))
    with torch.no_grad():
        out = module(example)
    if tuple(out.shape) != expected_shape:
        raise CompileError(f"{where}: output shape {tuple(out.shape)}, host gives {expected_shape}")
    if torch.count_nonzero(out).item() != 0:
        raise CompileError(f"{where}: not function-preserving (its output is not zero at init)")
    return module, example


def _flops_per_sample(module: nn.Module, example: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(example)
    return int(counter.get_total_flops() // example.shape[0])


def _validate_and_time(
    artifact: KernelArtifact,
    host: HostSignature,
    where: str,
    program: torch.export.ExportedProgram | None,
) -> float:
    """Run the kernel at another batch size (and spatial size), time the forward.

    An exported kernel is checked as the module of the program just exported, the graph its
    bytes hold, made runnable the way `deserialize` makes it. Loading the bytes back instead
    rebuilt every node's symbolic metadata from the JSON: a quarter of a compile, to re-check
    torch.export's own save/load round trip (the compiler tests load every built-in and host
    geometry from bytes). A TorchScript kernel is loaded from its bytes.
    """
    loaded = program_module(program) if program is not None else deserialize(artifact)
    probe = probe_input(host, batch=3)
    with torch.no_grad():
        try:
            out = loaded(probe)
        except Exception as err:
            raise CompileError(
                f"{where}: compiled kernel fails on {tuple(probe.shape)}: {err}"
            ) from None
        if tuple(out.shape) != host.output_shape(tuple(probe.shape)):
            raise CompileError(f"{where}: compiled kernel gives shape {tuple(out.shape)}")
        if not all(p.requires_grad for p in loaded.parameters()):
            raise CompileError(f"{where}: compiled kernel has frozen parameters")
        times = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            loaded(probe)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)

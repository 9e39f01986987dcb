"""What a kernel would hold in memory, estimated from sizes before it is built or run.

A compile: the blueprint is instantiated for the host signature on the meta device (shapes, no
storage) and run once on the compiler's example input, so a kernel of billions of parameters is
measured in milliseconds and refused without a byte of it being allocated.

An upload: a torch.export archive declares every weight, buffer and constant (and every value its
graph computes) with a dtype and sizes; those are read from the archive's JSON before the program
is loaded, so an archive declaring more than the budget is refused before its tensors are built.
A TorchScript archive (admin uploads only) keeps its tensor metadata in a pickle: it is measured
once loaded, before its forward runs.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.blueprints.builder import instantiate_shapes
from esper.blueprints.spec import BlueprintSpec
from esper.contracts import HostSignature
from esper.kernels.executor import EXAMPLE_BATCH
from urza.errors import KernelBudgetError, UploadBudgetError

FLOAT_BYTES = 4
PROBE_BATCH = 3  # the compiler's validation run (esper.blueprints.compiler._validate_and_time)


@dataclass(frozen=True)
class CompileEstimate:
    parameters: int
    parameter_bytes: int
    activation_bytes: int
    """The example input and every op's output on it, at the larger batch the compiler runs."""

    @property
    def total(self) -> int:
        # Export holds the weights twice (the module and the program's copy) while it saves.
        return 2 * self.parameter_bytes + self.activation_bytes


def estimate_compile(spec: BlueprintSpec, host: HostSignature) -> CompileEstimate:
    """Raises what instantiating the blueprint for `host` raises (BlueprintHostError)."""
    module = instantiate_shapes(spec, host)
    parameters = sum(p.numel() for p in module.parameters())
    batch = max(EXAMPLE_BATCH, PROBE_BATCH)
    if host.kind == "linear":
        shape: tuple[int, ...] = host.input_shape(batch)
    else:  # the example input's spatial size (esper.kernels.executor.example_input); a
        # conv1d host's input takes the second as its length
        shape = host.input_shape(batch, (host.min_extent(0) + 3, host.min_extent(1) + 5))
    values = _values(module, shape)
    return CompileEstimate(
        parameters=parameters,
        parameter_bytes=parameters * FLOAT_BYTES,
        activation_bytes=values * FLOAT_BYTES,
    )


def check_compile_budget(
    spec: BlueprintSpec, host: HostSignature, max_params: int, max_memory_bytes: int
) -> CompileEstimate:
    """Raises KernelBudgetError, naming the estimate and the budget, over either limit."""
    estimate = estimate_compile(spec, host)
    then = "" if host.downstream is None else f"→{host.downstream.out_features}"
    where = f"blueprint {spec.name!r} for {host.kind} {host.in_features}→{host.out_features}{then}"
    check_budget(estimate, where, max_params, max_memory_bytes)
    return estimate


def check_budget(
    estimate: CompileEstimate,
    where: str,
    max_params: int,
    max_memory_bytes: int,
    *,
    upload: bool = False,
) -> None:
    """The one budget check of compiles and uploads: raises KernelBudgetError (an upload:
    UploadBudgetError) naming the estimate and the budget, over either limit."""
    error = UploadBudgetError if upload else KernelBudgetError
    if estimate.parameters > max_params:
        holds = "holds" if upload else "would have"
        does = "accepts kernels of" if upload else "compiles"
        raise error(
            f"{where} {holds} {estimate.parameters:,} parameters; this Urza {does} at most "
            f"{max_params:,} (URZA_MAX_KERNEL_PARAMS)"
        )
    if estimate.total > max_memory_bytes:
        work = "load and probe" if upload else "compile"
        raise error(
            f"{where} would need about {estimate.total:,} bytes to {work} "
            f"({estimate.parameter_bytes:,} of weights, {estimate.activation_bytes:,} of "
            f"activations); this Urza allows {max_memory_bytes:,} bytes per {work} "
            "(URZA_MAX_KERNEL_MEMORY_BYTES)"
        )


def estimate_export_upload(data: bytes) -> CompileEstimate | None:
    """What a torch.export archive declares: its weights, buffers and constants (`parameters`
    counts them all: each is built when the program loads) and the values its graph computes at
    the sizes it was exported with. Nothing is unpickled or built. None when the archive is not
    laid out as torch.export writes it: the trust inspection then refuses it with its reason."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] + "/" if names else ""
        stored: list[dict[str, Any]] = []
        for config in (
            "weights/model_weights_config.json",
            "constants/model_constants_config.json",
        ):
            entries = json.loads(archive.read(f"{prefix}data/{config}"))["config"]
            stored.extend(entry["tensor_meta"] for entry in entries.values())
        program = json.loads(archive.read(f"{prefix}models/model.json"))
        values = program["graph_module"]["graph"]["tensor_values"]
        elements = sum(_numel(meta) for meta in stored)
        weight_bytes = sum(_numel(meta) * _itemsize(meta) for meta in stored)
        value_bytes = sum(_numel(meta) * _itemsize(meta) for meta in values.values())
    except (
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        RecursionError,
    ):
        return None
    # The graph's values include its weights (as placeholders): count those once.
    return CompileEstimate(
        parameters=elements,
        parameter_bytes=weight_bytes,
        activation_bytes=max(value_bytes - weight_bytes, 0),
    )


def estimate_loaded_upload(module: nn.Module) -> CompileEstimate:
    """A loaded kernel (TorchScript, whose metadata is pickled): its parameters and buffers.
    Its activations are not known before its forward runs; the probe runs at batch 1."""
    tensors = [*module.parameters(), *module.buffers()]
    return CompileEstimate(
        parameters=sum(t.numel() for t in tensors),
        parameter_bytes=sum(t.numel() * t.element_size() for t in tensors),
        activation_bytes=0,
    )


def _numel(meta: dict[str, Any]) -> int:
    """Elements of a serialized tensor: a symbolic size counts at the hint it was exported with,
    one without a hint (a data-dependent size) as 1."""
    total = 1
    for size in meta["sizes"]:
        hint = size["as_expr"].get("hint") if "as_int" not in size else size
        value = hint["as_int"] if hint is not None else 1
        if int(value) < 0:
            raise ValueError("a negative size")
        total *= int(value)
    return total


def _itemsize(meta: dict[str, Any]) -> int:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta["dtype"])
    return dtype.itemsize if dtype is not None else 8


def _values(module: nn.Module, shape: tuple[int, ...]) -> int:
    """The input's values plus those every op outputs, for an input of `shape`."""
    total = 1
    for size in shape:
        total *= size
    outputs: list[int] = []

    def record(leaf: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())

    # Every op's output, blocks (a residual, a gate) included; a Sequential's is its last op's.
    ops = [m for m in module.modules() if not isinstance(m, nn.Sequential)]
    handles = [op.register_forward_hook(record) for op in ops]
    try:
        with torch.no_grad():
            module(torch.empty(shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total + sum(outputs)

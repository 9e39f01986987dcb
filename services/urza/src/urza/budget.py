"""What a compile would hold in memory, estimated from sizes before it is queued: the blueprint is
instantiated for the host signature on the meta device (shapes, no storage) and run once on the
compiler's example input, so a kernel of billions of parameters is measured in milliseconds and
refused without a byte of it being allocated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper.blueprints.builder import instantiate_shapes
from esper.blueprints.spec import BlueprintSpec
from esper.contracts import HostSignature
from esper.kernels.executor import EXAMPLE_BATCH
from urza.errors import KernelBudgetError

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
    else:  # the example input's spatial size (esper.kernels.executor.example_input)
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
    where = f"blueprint {spec.name!r} for {host.kind} {host.in_features}→{host.out_features}"
    if estimate.parameters > max_params:
        raise KernelBudgetError(
            f"{where} would have {estimate.parameters:,} parameters; this Urza compiles at most "
            f"{max_params:,} (URZA_MAX_KERNEL_PARAMS)"
        )
    if estimate.total > max_memory_bytes:
        raise KernelBudgetError(
            f"{where} would need about {estimate.total:,} bytes to compile "
            f"({estimate.parameter_bytes:,} of weights, {estimate.activation_bytes:,} of "
            f"activations); this Urza allows {max_memory_bytes:,} bytes per compile "
            "(URZA_MAX_KERNEL_MEMORY_BYTES)"
        )
    return estimate


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

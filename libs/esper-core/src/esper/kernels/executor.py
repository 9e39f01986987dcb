"""KernelExecutor: artifact bytes ⇄ trainable modules, and the checks against a host layer.

torch.export is the default format: `ExportedProgram.module()` gives a trainable GraphModule that
torch.compile traces straight through. TorchScript is kept because the original design names it;
it is deprecated since torch 2.13 and a ScriptModule is a hard graph break under torch.compile.
"""

from __future__ import annotations

import copy
import io
import threading
import types
import warnings
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from esper.contracts.kernels import HostSignature
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import (
    ArtifactError,
    CorruptArtifactError,
    KernelDtypeError,
    KernelShapeError,
    UnsupportedHostError,
    UntrustedKernelError,
)
from esper.kernels.artifact import KernelArtifact
from esper.kernels.inspection import inspect_script_module, load_export_program

EXAMPLE_BATCH = 5  # distinct from the spatial example sizes, so export does not unify the dims
PROBE_SEED = 0x5EED


def probe_input(
    host: HostSignature,
    batch: int = 3,
    hw: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A fixed input of the host's shape drawn from its own generator: probing a kernel never
    advances the caller's RNG, and compiling twice gives the same bytes (torch.export saves its
    example inputs in the artifact)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    sample = torch.randn(host.input_shape(batch, hw), generator=generator)
    return sample.to(device=device, dtype=dtype)


def example_input(host: HostSignature) -> torch.Tensor:
    if host.kind == "linear":
        return probe_input(host, batch=EXAMPLE_BATCH)
    # A conv1d input takes the second extent as its length (HostSignature.input_shape).
    hw = (host.min_extent(0) + 3, host.min_extent(1) + 5)
    return probe_input(host, batch=EXAMPLE_BATCH, hw=hw)


# torch.export keeps module-global state while it saves and loads (a load running while another
# does fails with "_CURRENT_DESERIALIZER is already set"), and caches deserialize in threads.
_EXPORT_LOCK = threading.Lock()


def serialize(module: nn.Module, host: HostSignature, fmt: KernelFormat) -> bytes:
    """Export (batch, and for conv H and W or L, dynamic) or script `module`; return the
    file bytes."""
    if fmt == "export":
        return save_program(export_program(module, host))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.train()), buffer)
    return buffer.getvalue()


def export_program(module: nn.Module, host: HostSignature) -> torch.export.ExportedProgram:
    """torch.export of `module` (train mode) with the batch, and for conv H and W or L, dynamic."""
    dims: dict[int, Any] = {0: Dim.AUTO}
    if host.kind == "conv2d":
        dims.update({2: Dim.AUTO, 3: Dim.AUTO})
    elif host.kind == "conv1d":
        dims[2] = Dim.AUTO
    # FakeTensor's dispatch cache lives on each export's own ShapeEnv, so an entry is never
    # reused by a later compile, and making one re-synthesizes and checks every symbolic
    # output: 20-40 % of an export's time (conv blueprints, whose H and W are dynamic). The
    # cache only memoizes, so the program and its bytes are the same without it.
    with _EXPORT_LOCK, torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        return torch.export.export(module.train(), (example_input(host),), dynamic_shapes=(dims,))


def save_program(program: torch.export.ExportedProgram) -> bytes:
    """The artifact bytes of an exported program (torch.export.save's archive)."""
    buffer = io.BytesIO()
    with _EXPORT_LOCK:
        torch.export.save(program, buffer)
    return buffer.getvalue()


def program_module(program: torch.export.ExportedProgram) -> nn.Module:
    """The trainable module of an exported program, as `deserialize` gives it for its bytes."""
    # No guards: .module() would exec() the archive's guard code; the executor's probe and the
    # layer's shape checks do that work.
    module: nn.Module = program.module(check_guards=False)
    # ExportedProgram.module() shadows train()/eval() with methods that raise, so a model
    # holding the kernel as a submodule could no longer call model.train() or model.eval().
    # The graph has no modes (blueprints have no dropout or batch norm), so nn.Module's own
    # train()/eval(), which only set the flag, are correct.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    if isinstance(module, torch.fx.GraphModule):
        _drop_call_wrapping(module)
    return module


def deserialize(artifact: KernelArtifact, *, trust_torchscript: bool = False) -> nn.Module:
    """Bytes → module on the CPU, inspected before any of the kernel's code can run (see
    esper.kernels.inspection): an operator off the allow-list is an UnsafeKernelError.

    A torch.export archive is read by the inspection's own loader, never `torch.export.load`
    (which unpickles and evals what the archive says). A TorchScript archive runs its
    `__setstate__` while loading, so it is loaded only when `meta.vouched_by` says who vouches
    for it (the blueprint compiler, or an Urza admin upload; check the signature first:
    `verify`) or the caller passes `trust_torchscript`; else UntrustedKernelError. Its methods
    are then inspected before anything calls forward."""
    meta = artifact.meta
    where = f"kernel {meta.kernel_id}"
    if meta.format == "torchscript" and meta.vouched_by is None and not trust_torchscript:
        raise UntrustedKernelError(
            f"{where}: TorchScript runs code from the archive (__setstate__) while it loads, "
            "before it can be inspected; it is loaded only when Urza vouches for it (compiled "
            "by Urza, or uploaded with Urza's admin token) or this loader trusts TorchScript"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if meta.format == "export":
                with _EXPORT_LOCK:
                    program = load_export_program(artifact.data, where)
                    module: nn.Module = program_module(program)
            else:
                module = torch.jit.load(io.BytesIO(artifact.data), map_location="cpu")
                inspect_script_module(module, where)  # type: ignore[arg-type]
    except ArtifactError:
        raise
    except Exception as err:
        raise CorruptArtifactError(
            f"{where}: artifact is not a loadable {meta.format} kernel "
            f"({type(err).__name__}: {str(err)[:200]})"
        ) from None
    return module


def _drop_call_wrapping(module: torch.fx.GraphModule) -> None:
    """Make the exported graph a plain `forward(x) -> y`.

    `.module()` wraps the graph in a pytree flatten/unflatten and an input-guard call: ~35 µs per
    call, several percent of a small layer's step. The executor's probe already checked the kernel
    against its host, and the layer checks every output's shape. Only the exact one-tensor-in,
    one-tensor-out shape is rewritten; anything else is left as torch made it.
    """
    graph = module.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    if len(inputs) != 1 or not isinstance(results, tuple | list) or len(results) != 1:
        return
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
            module.delete_submodule("_guards_fn")
    graph.set_codegen(torch.fx.graph.CodeGen())
    output.args = (results[0],)
    module.recompile()


def clone_module(template: nn.Module) -> nn.Module:
    """A copy with its own parameters and buffers. For GraphModules this shares the generated code:
    deepcopy would regenerate and exec it (~2 ms), far over the 1 ms attach budget."""
    if isinstance(template, torch.jit.ScriptModule):
        # deepcopy records the copies in autograd (non-leaf parameters, which an optimizer
        # refuses) unless grad mode is off; then requires_grad has to be restored by hand.
        with torch.no_grad():
            scripted = copy.deepcopy(template)
        for (_, p), (_, original) in zip(
            scripted.named_parameters(), template.named_parameters(), strict=True
        ):
            p.requires_grad_(original.requires_grad)
        return scripted
    clone = object.__new__(type(template))
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in template.__dict__.items()}
    # Methods bound to the template as instance attributes follow the copy.
    for k, v in state.items():
        if isinstance(v, types.MethodType) and v.__self__ is template:
            state[k] = types.MethodType(v.__func__, clone)
    state["_parameters"] = {
        k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for k, p in template._parameters.items()
    }
    state["_buffers"] = {
        k: None if b is None else b.detach().clone() for k, b in template._buffers.items()
    }
    state["_modules"] = {
        k: None if m is None else clone_module(m) for k, m in template._modules.items()
    }
    clone.__dict__ = state
    return clone


class KernelExecutor:
    """Prepares a cached kernel for one host layer: its own copy, on the host's device and dtype,
    checked by a probe forward before it may become ACTIVE."""

    def prepare(
        self,
        template: nn.Module,
        host_layer: nn.Module,
        kernel_id: str,
        layer_name: str = "",
        *,
        downstream_layer: nn.Module | None = None,
    ) -> nn.Module:
        """`downstream_layer`: the next layer, for a widening kernel (one that reads
        `host_layer`'s input and adds to `downstream_layer`'s output); the probe then expects
        the two layers' composite output shape."""
        host = _host_signature(host_layer, downstream_layer)
        reference = next(host_layer.parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None else torch.float32
        module = clone_module(template).to(device=device, dtype=dtype)
        probe = probe_input(host, batch=3, dtype=dtype, device=device)
        where = f"kernel {kernel_id} in layer {layer_name!r}"
        with torch.no_grad():
            expected = host_layer(probe)
            if downstream_layer is not None:
                expected = downstream_layer(expected)
            try:
                out = module(probe)
            except Exception as err:
                raise KernelShapeError(
                    f"{where}: probe forward on input {tuple(probe.shape)} failed: "
                    f"{type(err).__name__}: {str(err)[:200]}"
                ) from None
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise KernelShapeError(
                f"{where}: output shape {got} does not match the host's {tuple(expected.shape)} "
                f"for input {tuple(probe.shape)}"
            )
        if out.dtype != expected.dtype:
            raise KernelDtypeError(
                f"{where}: output dtype {out.dtype} does not match the host's {expected.dtype}"
            )
        return module


def _host_signature(host_layer: nn.Module, downstream_layer: nn.Module | None) -> HostSignature:
    host = HostSignature.of(host_layer)
    if downstream_layer is None:
        return host
    downstream = HostSignature.of(downstream_layer)
    # `widening` copies without validating: check here that the layers chain.
    if downstream.kind != host.kind or downstream.in_features != host.out_features:
        raise UnsupportedHostError(
            f"the downstream {downstream.kind} layer reads {downstream.in_features} features; "
            f"the {host.kind} host gives {host.out_features}"
        )
    return host.widening(downstream)

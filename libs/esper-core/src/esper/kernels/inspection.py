"""What a kernel's program may do, checked before any of its code runs.

A kernel is code: a torch.export program or a TorchScript module whose forward runs inside Urza
(the probe of an upload) and inside every training job that loads it. Only tensor math may run.
Urza's upload path and the job's executor both call this module, so the two can never disagree.

torch.export archives (`load_export_program`). `torch.export.load` is not safe for bytes from
outside: it unpickles weights, constants and custom objects with `weights_only=False` (arbitrary
Python), falls back to `weights_only=False` when a safe load fails, loads AOTInductor shared
libraries, evaluates every symbolic-shape string with `sympy.sympify` (which `eval`s), and
`.module()` `exec`s the archive's `guards_code`. So this module reads the archive itself: it
accepts only the files torch.export.save writes for one plain program, only raw (unpickled)
tensor payloads, sample inputs through `torch.load(weights_only=True)`, symbolic expressions
of a closed sympy vocabulary, names without quotes or brackets (fx generates Python source from
them), and graph nodes whose targets are on the allow-list below. Node metadata (stack traces
fx may copy into generated source) and guard code are dropped. Only then are the pieces handed
to torch's deserializer, and the built graph is checked once more against the same allow-list.

TorchScript (`inspect_script_module`). Loading a TorchScript archive runs its `__setstate__`
methods, compiled from source the archive carries, before anything can look at them: such an
archive cannot be inspected without running code. Who may make one run is a rule of the caller
(Urza: only uploaders holding the admin token; a job: only kernels Urza vouches for, see
`KernelMeta.vouched_by`). After loading, every method of every submodule is still checked
against the allow-list before its forward runs.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from esper.exceptions import CorruptArtifactError, UnsafeKernelError

# --------------------------------------------------------------------------------- allow-list
ALLOWED_ATEN_OPS: frozenset[str] = frozenset(
    {
        # layers the blueprint library emits, and their decompositions
        "linear",
        "addmm",
        "mm",
        "bmm",
        "matmul",
        "t",
        "conv1d",
        "conv2d",
        "convolution",
        "_convolution",
        "group_norm",
        "native_group_norm",
        "layer_norm",
        "native_layer_norm",
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "native_batch_norm",
        # activations
        "relu",
        "gelu",
        "silu",
        "tanh",
        "sigmoid",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "leaky_relu",
        "elu",
        "softplus",
        "mish",
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "glu",
        "erf",
        # elementwise math
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "neg",
        "abs",
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "reciprocal",
        "pow",
        "square",
        "clamp",
        "clamp_min",
        "clamp_max",
        "maximum",
        "minimum",
        "where",
        "sign",
        "sin",
        "cos",
        "lerp",
        "addcmul",
        "addcdiv",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_not",
        "logical_and",
        "logical_or",
        # reductions and pooling
        "mean",
        "sum",
        "amax",
        "amin",
        "max",
        "min",
        "var",
        "std",
        "var_mean",
        "norm",
        "linalg_vector_norm",
        "avg_pool2d",
        "max_pool2d",
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        # shape and layout
        "view",
        "_unsafe_view",
        "reshape",
        "expand",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "permute",
        "transpose",
        "contiguous",
        "clone",
        "detach",
        "alias",
        "slice",
        "select",
        "narrow",
        "chunk",
        "split",
        "split_with_sizes",
        "unbind",
        "cat",
        "stack",
        "pad",
        "constant_pad_nd",
        "repeat",
        "flip",
        "roll",
        "pixel_shuffle",
        "pixel_unshuffle",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "_to_copy",
        "to",
        "type_as",
        "zeros_like",
        "ones_like",
        "full_like",
        "empty_like",
        "zeros",
        "ones",
        "full",
        "arange",
        "scalar_tensor",
        "dropout",
        "native_dropout",
        "copy",
        "masked_fill",
        "index_select",
        "gather",
        # symbolic sizes and export's own shape assertions
        "sym_size",
        "sym_numel",
        "sym_stride",
        "sym_storage_offset",
        "size",
        "dim",
        "numel",
        "_assert_scalar",
        "_assert_tensor_metadata",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
    }
)
"""aten operators (any overload) that compute on tensors and nothing else: no file, socket,
process, storage-from-file, print, sleep or RNG-state op is here, and none may be added."""

ALLOWED_PRIMS_OPS: frozenset[str] = frozenset({"convert_element_type", "broadcast_in_dim"})

# Python callables an export graph names for symbolic-size arithmetic and tuple outputs.
ALLOWED_PYTHON_TARGETS: frozenset[str] = frozenset(
    {
        *(
            f"_operator.{name}"
            for name in (
                "getitem",
                "add",
                "sub",
                "mul",
                "floordiv",
                "truediv",
                "mod",
                "neg",
                "pos",
                "eq",
                "ne",
                "lt",
                "le",
                "gt",
                "ge",
                "and_",
                "or_",
            )
        ),
        "math.trunc",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_int",
        "torch.sym_float",
        "torch.sym_not",
        "torch.sym_ite",
    }
)

# TorchScript's scalar, list and control-flow ops around the tensor math.
ALLOWED_TORCHSCRIPT_OPS: frozenset[str] = frozenset(
    {
        *(
            f"prim::{name}"
            for name in (
                "Constant",
                "GetAttr",
                "If",
                "Loop",
                "ListConstruct",
                "ListUnpack",
                "TupleConstruct",
                "TupleUnpack",
                "TupleIndex",
                "RaiseException",
                "Uninitialized",
                "unchecked_cast",
                "NumToTensor",
                "dtype",
                "device",
                "min",
                "max",
                "isinstance",
                "shape",
                "is_cuda",
                "layout",
                "requires_grad",
            )
        ),
        *(
            f"aten::{name}"
            for name in (
                "__getitem__",
                "__is__",
                "__isnot__",
                "__not__",
                "__and__",
                "__or__",
                "len",
                "list",
                "format",
                "floordiv",
                "Int",
                "Float",
                "Bool",
                "ScalarImplicit",
                "IntImplicit",
                "FloatImplicit",
                "__range_length",
                "__derive_index",
                "_set_item",
                "append",
            )
        ),
    }
)


def operator_allowed(namespace: str, name: str) -> bool:
    """Is `namespace::name` (any overload) on the allow-list? An in-place variant (`relu_`) is
    allowed when its op is: it writes only into the tensor it is given."""
    base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if namespace == "aten":
        return base in ALLOWED_ATEN_OPS
    if namespace == "prims":
        return base in ALLOWED_PRIMS_OPS
    return False


def _refuse_operator(where: str, op: str) -> UnsafeKernelError:
    return UnsafeKernelError(
        f"{where}: calls operator {op}, which is not on the allow-list of tensor-math operators "
        "(no file, socket, process, storage-from-file, print, sleep or custom operators)"
    )


# -------------------------------------------------------------------------- torch.export
_SERIALIZED_OP = re.compile(
    r"torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(\.\w+)?"
)


def check_serialized_target(target: str, where: str) -> None:
    """A node target as torch.export's JSON spells it (`torch.ops.aten.linear.default`)."""
    match = _SERIALIZED_OP.fullmatch(target)
    if match is not None:
        namespace, name = match.group(1), match.group(2)
        if operator_allowed(namespace, name):
            return
        raise _refuse_operator(where, f"{namespace}::{name}")
    if target in ALLOWED_PYTHON_TARGETS:
        return
    raise _refuse_operator(where, target)


# The archive files torch.export.save writes for one program named "model" (under one folder).
_ARCHIVE_FILES = re.compile(
    r"\.data/serialization_id|\.data/version|archive_format|archive_version|byteorder|version"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
)

# sympy's srepr of symbolic sizes, the one form torch.export writes: calls of a closed set of
# sympy names on integers and quoted symbol names, with boolean assumption keywords. No
# attribute access, indexing, dunder or power: nothing `sympify`'s eval could misuse or blow up.
_EXPR_TOKEN = re.compile(
    r"\s*(?:('[A-Za-z][A-Za-z0-9]*')|(-?\d{1,19})|([A-Za-z][A-Za-z0-9]*)|([(),=]))"
)
_EXPR_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Add",
        "Mul",
        "Max",
        "Min",
        "FloorDiv",
        "Mod",
        "PythonMod",
        "CeilToInt",
        "FloorToInt",
        "TruncToInt",
        "CleanDiv",
        "IntTrueDiv",
        "FloatTrueDiv",
        "ToFloat",
        "Abs",
        "Eq",
        "Ne",
        "Ge",
        "Gt",
        "Le",
        "Lt",
        "StrictGreaterThan",
        "StrictLessThan",
        "GreaterThan",
        "LessThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Rational",
        "True",
        "False",
        "true",
        "false",
        "oo",
        "Infinity",
        "NegativeInfinity",
        "NegativeOne",
        "One",
        "Zero",
        "Half",
        "positive",
        "negative",
        "integer",
        "nonnegative",
        "nonpositive",
        "nonzero",
        "real",
        "finite",
        "zero",
    }
)
_MAX_EXPR = 2000
# Every other string the program holds is a name: fx turns names into Python source.
_NAME = re.compile(r"[A-Za-z0-9_.+\-]*")
# Strings that are neither names nor expressions, and are parsed as data, not code.
_DATA_KEYS = frozenset({"in_spec", "out_spec"})


def _check_expr(expr: str, where: str) -> None:
    if len(expr) > _MAX_EXPR:
        raise UnsafeKernelError(f"{where}: a symbolic size expression is over {_MAX_EXPR} chars")
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            if expr[pos:].strip() == "":
                return
            raise UnsafeKernelError(
                f"{where}: symbolic size expression {expr[:80]!r} is not plain sympy arithmetic "
                f"(at {expr[pos : pos + 20]!r})"
            )
        name = match.group(3)
        if name is not None and name not in _EXPR_NAMES:
            raise UnsafeKernelError(
                f"{where}: symbolic size expression {expr[:80]!r} names {name!r}, which is not "
                "a sympy arithmetic name"
            )
        pos = match.end()


def _walk_program_json(node: Any, where: str, key: str | None = None) -> None:
    """Check every string of the serialized program; drop metadata and guard code in place."""
    if isinstance(node, dict):
        # A node; one missing its other fields still has its call checked again once built.
        if isinstance(node.get("target"), str) and "inputs" in node:
            check_serialized_target(node["target"], where)
            node["metadata"] = {}  # stack traces and module paths: fx copies some into source
        for k, v in node.items():
            if not _NAME.fullmatch(k):  # keys name parameters and symbols too
                raise UnsafeKernelError(
                    f"{where}: the program holds a name {k[:80]!r} that is not a plain identifier"
                )
            if k == "guards_code":
                continue
            _walk_program_json(v, where, k)
        if "guards_code" in node:
            # .module() exec()s these; the probe forward and the layer's shape checks stand in.
            node["guards_code"] = []
    elif isinstance(node, list):
        for item in node:
            _walk_program_json(item, where, key)
    elif isinstance(node, str):
        if key == "expr_str":
            _check_expr(node, where)
        elif key in _DATA_KEYS:
            return  # JSON that pytree parses as data, looking types up in its registry
        elif not _NAME.fullmatch(node):
            raise UnsafeKernelError(
                f"{where}: the program holds a name {node[:80]!r} that is not a plain identifier"
            )


def _payload_config(archive: zipfile.ZipFile, path: str, where: str) -> dict[str, Any]:
    config = json.loads(archive.read(path))
    entries = config.get("config")
    if not isinstance(entries, dict):
        raise _corrupt(where, f"{path} is not a payload config")
    for fqn, payload in entries.items():
        if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
            raise UnsafeKernelError(
                f"{where}: payload {fqn!r} is pickled; only raw tensor payloads are accepted"
            )
        if not _NAME.fullmatch(str(fqn)) or not _NAME.fullmatch(str(payload.get("path_name"))):
            raise UnsafeKernelError(f"{where}: payload name {str(fqn)[:80]!r} is not plain")
    return config


def _check_payload_sizes(
    archive: zipfile.ZipFile, prefix: str, folder: str, config: dict[str, Any], where: str
) -> None:
    """torch makes a zero-filled tensor of the declared size for an empty record: refuse one
    that declares elements, so a few bytes cannot ask for gigabytes."""
    for payload in config["config"].values():
        info = archive.getinfo(f"{prefix}{folder}{payload['path_name']}")
        sizes = (payload.get("tensor_meta") or {}).get("sizes") or []
        numel = 1
        for size in sizes:
            numel *= int(size.get("as_int", 1)) if isinstance(size, dict) else 1
        if info.file_size == 0 and numel != 0:
            raise UnsafeKernelError(
                f"{where}: payload {payload['path_name']} is empty but declares {numel} elements"
            )


def _corrupt(where: str, why: str) -> CorruptArtifactError:
    return CorruptArtifactError(f"{where}: artifact is not a loadable export kernel ({why})")


def load_export_program(data: bytes, where: str) -> torch.export.ExportedProgram:
    """A torch.export archive → its ExportedProgram, inspected before any part of it runs.

    Raises UnsafeKernelError for an operator or construct off the allow-list, and
    CorruptArtifactError for bytes that are not such an archive.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive._package import (
        PT2ArchiveReader,
        _load_constants,
        _load_state_dict,
    )

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise _corrupt(where, f"not a torch.export archive ({err})") from None
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1 or any("/" not in name for name in names):
        raise _corrupt(where, "not a torch.export archive (one folder expected)")
    prefix = next(iter(prefixes)) + "/"
    if prefix + "models/model.json" not in names or prefix + "archive_format" not in names:
        raise _corrupt(where, "not a torch.export archive (no models/model.json)")
    for name in names:
        if not _ARCHIVE_FILES.fullmatch(name[len(prefix) :]):
            raise UnsafeKernelError(
                f"{where}: the archive holds {name[len(prefix) :][:80]!r}, which is not part of a "
                "plain torch.export program (custom objects, pickles, compiled libraries and "
                "extra programs are refused)"
            )
    try:
        program = json.loads(archive.read(prefix + "models/model.json"))
        weights = _payload_config(archive, prefix + "data/weights/model_weights_config.json", where)
        constants = _payload_config(
            archive, prefix + "data/constants/model_constants_config.json", where
        )
        sample_bytes = archive.read(prefix + "data/sample_inputs/model.pt")
    except KeyError as err:
        raise _corrupt(where, f"not a torch.export archive (missing {err})") from None
    except json.JSONDecodeError as err:
        raise _corrupt(where, f"a torch.export archive with bad JSON ({err})") from None
    _walk_program_json(program, where)
    _check_payload_sizes(archive, prefix, "data/weights/", weights, where)
    _check_payload_sizes(archive, prefix, "data/constants/", constants, where)
    for payload in constants["config"].values():
        if not str(payload.get("path_name", "")).startswith("tensor_"):
            raise UnsafeKernelError(
                f"{where}: constant {payload.get('path_name')!r} is not a tensor"
            )

    try:
        # weights_only: the restricted unpickler builds tensors and containers, never a global.
        example_inputs = torch.load(io.BytesIO(sample_bytes), weights_only=True)
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        with PT2ArchiveReader(io.BytesIO(data)) as reader:
            # Both read only raw tensor records: the configs were checked to pickle nothing.
            state_dict = _load_state_dict(reader, "model")
            tensors = _load_constants(reader, "model")
        loaded = ExportedProgramDeserializer().deserialize(
            serialized, state_dict, tensors, example_inputs
        )
    except UnsafeKernelError:
        raise
    except Exception as err:
        raise _corrupt(
            where, f"not a loadable torch.export program ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    inspect_export_program(loaded, where)
    return loaded


def _graph_modules(module: torch.nn.Module) -> Iterator[torch.fx.GraphModule]:
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            yield sub


def inspect_export_program(program: torch.export.ExportedProgram, where: str) -> None:
    """Every call in the program's graphs (nested ones too) is an allowed operator."""
    for graph_module in _graph_modules(program.graph_module):
        for node in graph_module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise _refuse_operator(where, f"{node.op} {node.target}")
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                schema_name: str = target._schema.name
                namespace, _, name = schema_name.partition("::")
                if not operator_allowed(namespace, name):
                    raise _refuse_operator(where, schema_name)
                continue
            qualified = f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', '?')}"
            if qualified not in ALLOWED_PYTHON_TARGETS:
                raise _refuse_operator(where, qualified)


# --------------------------------------------------------------------------- TorchScript
def is_torchscript_archive(data: bytes) -> bool:
    """Whether the bytes have TorchScript's archive layout; looks, runs nothing."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, ValueError):
        return False
    tails = {name.split("/", 1)[1] for name in names if "/" in name}
    return "data.pkl" in tails and any(t.startswith("code/") for t in tails)


def _script_nodes(block: Any) -> Iterator[Any]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _script_nodes(inner)


def inspect_script_module(module: torch.jit.ScriptModule, where: str) -> None:
    """Every method of every submodule (inlined) calls only allowed operators; no hooks."""
    for sub in module.modules():
        c_module = getattr(sub, "_c", None)
        if c_module is None:
            raise UnsafeKernelError(f"{where}: holds a submodule that is not TorchScript")
        if c_module._get_forward_hooks() or c_module._get_forward_pre_hooks():
            raise UnsafeKernelError(f"{where}: has forward hooks, which are refused")
        for method in c_module._method_names():
            for node in _script_nodes(c_module._get_method(method).inlined_graph):
                kind = node.kind()
                if kind in ALLOWED_TORCHSCRIPT_OPS:
                    continue
                namespace, _, name = kind.partition("::")
                if not operator_allowed(namespace, name):
                    raise _refuse_operator(f"{where} ({method})", kind)

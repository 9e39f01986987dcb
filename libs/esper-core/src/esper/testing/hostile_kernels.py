"""Kernels that do more than tensor math, built the way an uploader would build them, for the
tests of the kernel inspection (esper.kernels.inspection) in the library and in Urza.

Each is harmless by construction should a check ever let it through: it touches only the
`marker` path it is given (a file in the test's temp directory), sleeps at most `NAP_S`, and
allocates nothing large, so a broken check fails its test (the marker exists, the reason does
not name the operator) without harming the machine. All fit a Linear(`WIDTH`, `WIDTH`) host.

TorchScript kernels are scripted from the classes below (scripting needs their source file).
torch.export cannot trace most of these operators (no fake kernels for file ops), so those
archives are made as an attacker would: export a harmless call, then rewrite its target in
the archive's JSON.
"""

from __future__ import annotations

import io
import json
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

WIDTH = 4
NAP_S = 0.05
NAMESPACE = "esper_hostile"
NAP_OP = f"{NAMESPACE}::nap"
_NAP_TARGET = f"torch.ops.{NAMESPACE}.nap.default"


def register_nap() -> None:
    """`esper_hostile::nap(x, marker)`: a custom operator that writes `marker`, sleeps NAP_S and
    returns zeros. Registered once per process (torch keeps operators for its lifetime)."""
    if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "nap"):
        return

    @torch.library.custom_op(NAP_OP, mutates_args=())
    def nap(x: torch.Tensor, marker: str) -> torch.Tensor:
        Path(marker).write_text("a kernel ran a custom operator")
        time.sleep(NAP_S)
        return torch.zeros_like(x)

    @nap.register_fake
    def _(x: torch.Tensor, marker: str) -> torch.Tensor:
        return torch.empty_like(x)


# ------------------------------------------------------------------------------ TorchScript
class MapsAFile(nn.Module):
    """Maps `marker` into a tensor (`torch.from_file(shared=True)`) and writes through it."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8)
        written = mapped.copy_(torch.ones(4, dtype=torch.uint8))
        return x * 0.0 + written.float().sum() * 0.0  # used, so scripting keeps the write


class ReadsAFile(nn.Module):
    """Reads `path` into a tensor (`torch.from_file(shared=False)`)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=4, dtype=torch.uint8)
        return x * 0.0 + data.float().sum() * 0.0


class WritesAFile(nn.Module):
    """Writes `marker` with `aten::save`."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten.save(x, self.marker)
        return x * 0.0


class Prints(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("a kernel printed")
        return x * 0.0


class Naps(nn.Module):
    """Calls the custom operator `esper_hostile::nap` (register_nap first)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.esper_hostile.nap(x, self.marker)


def torchscript_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


TORCHSCRIPT_KERNELS: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    # case: (module of the marker path, the operator the refusal must name)
    "maps_a_file": (MapsAFile, "aten::from_file"),
    "reads_a_file": (ReadsAFile, "aten::from_file"),
    "writes_a_file": (WritesAFile, "aten::save"),
    "prints": (lambda _: Prints(), "prim::Print"),
    "custom_op": (Naps, NAP_OP),
}


# ------------------------------------------------------------------------------ torch.export
def export_bytes(module: nn.Module) -> bytes:
    program = torch.export.export(module, (torch.randn(3, WIDTH),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def rewrite_archive(data: bytes, edit: Callable[[str, bytes], bytes]) -> bytes:
    """The archive with each file's bytes replaced by `edit(name, bytes)`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, edit(item.filename, src.read(item)))
    return out.getvalue()


def edit_program(data: bytes, edit: Callable[[dict[str, object]], None]) -> bytes:
    """The archive with its program JSON (models/model.json) changed in place by `edit`."""

    def change(name: str, content: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return content
        program = json.loads(content)
        edit(program)
        return json.dumps(program).encode()

    return rewrite_archive(data, change)


def naps_export(marker: str) -> bytes:
    """A real torch.export program calling the custom operator (register_nap first)."""
    register_nap()
    return export_bytes(Naps(marker))


def retargeted_export(marker: str, target: str) -> bytes:
    """`naps_export` with the custom operator's node retargeted to `target` (as the JSON spells
    it: `torch.ops.aten.from_file.default`, `time.sleep`)."""
    data = naps_export(marker)
    text_of = json.dumps

    def retarget(program: dict[str, object]) -> None:
        text = text_of(program).replace(f'"{_NAP_TARGET}"', json.dumps(target))
        program.clear()
        program.update(json.loads(text))

    return edit_program(data, retarget)


EXPORT_KERNELS: dict[str, tuple[Callable[[str], bytes], str]] = {
    # case: (archive bytes of the marker path, the operator the refusal must name)
    "maps_a_file": (
        lambda marker: retargeted_export(marker, "torch.ops.aten.from_file.default"),
        "aten::from_file",
    ),
    "writes_a_file": (
        lambda marker: retargeted_export(marker, "torch.ops.aten.save.default"),
        "aten::save",
    ),
    "sleeps": (lambda marker: retargeted_export(marker, "time.sleep"), "time.sleep"),
    "runs_a_process": (lambda marker: retargeted_export(marker, "os.system"), "os.system"),
    "custom_op": (naps_export, NAP_OP),
}

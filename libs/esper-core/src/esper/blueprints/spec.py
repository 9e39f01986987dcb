"""The blueprint language: a validated spec of a small network, as data.

Sizes (`out`, `groups`) are ints or expressions over `in`, `out` (the host's features or
channels) and the blueprint's `params`, e.g. `"max(8, out/4)"`. Ops that carry the host's geometry
(`host_proj`, and `conv`/`depthwise` with `kernel: "host"`) apply the host's kernel size, stride,
padding and dilation, so the seed's output has the host's spatial shape; a conv blueprint has
exactly one of them at top level. There is no dropout: an exported kernel would bake its mode in.

A *widening* blueprint (`widens: true`) grows a layer A and the next layer B (A → act → B) by
k hidden units: its seed reads A's input and adds to B's output, so it is compiled only for a
widening host (a `HostSignature` with `downstream`). Its last op is `next_proj`, a projection
with B's geometry; `in` is A's input width, `out` B's output width and `mid` A's output width
(the hidden width being widened). Only a widening blueprint may name `mid` or use `next_proj`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esper.blueprints.sizes import parse_size
from esper.contracts.vocabulary import Blend
from esper.exceptions import BlueprintSpecError

Size = int | str
HostKind = Literal["linear", "conv2d", "conv1d"]
RESERVED_NAMES = {"in", "in_", "out", "mid", "min", "max"}  # `in` is parsed as `in_`
MAX_OPS = 32
MAX_KERNEL = 31  # an op's own kernel size (odd); a bigger one is a host's (`kernel: "host"`)


class _Op(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def sizes(self) -> list[Size]:
        return []

    @property
    def carries_geometry(self) -> bool:
        return False

    @property
    def conv_only(self) -> bool:
        return False


class ProjectOp(_Op):
    """Linear on a linear host, 1×1 convolution on a conv host."""

    op: Literal["project"] = "project"
    out: Size
    bias: bool = True

    def sizes(self) -> list[Size]:
        return [self.out]


class HostProjOp(ProjectOp):
    """A projection with the host's own geometry (Linear, or the host's conv kernel/stride/…)."""

    op: Literal["host_proj"] = "host_proj"  # type: ignore[assignment]

    @property
    def carries_geometry(self) -> bool:
        return True


class NextProjOp(_Op):
    """A projection with the downstream layer's geometry (Linear, or its conv kernel/stride/…):
    the last op of a widening blueprint, mapping the new hidden units to the next layer's
    output."""

    op: Literal["next_proj"] = "next_proj"
    out: Size
    bias: bool = True

    def sizes(self) -> list[Size]:
        return [self.out]


class _KernelOp(_Op):
    kernel: int | Literal["host"] = 3

    @property
    def carries_geometry(self) -> bool:
        return self.kernel == "host"

    @property
    def conv_only(self) -> bool:
        return True

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int | str) -> int | str:
        if isinstance(v, int) and (v < 1 or v % 2 == 0 or v > MAX_KERNEL):
            raise ValueError(
                f"kernel must be odd, ≥ 1 and ≤ {MAX_KERNEL} (same padding), or 'host'"
            )
        return v


class ConvOp(_KernelOp):
    op: Literal["conv"] = "conv"
    out: Size
    groups: Size = 1
    bias: bool = True

    def sizes(self) -> list[Size]:
        return [self.out, self.groups]


class DepthwiseOp(_KernelOp):
    op: Literal["depthwise"] = "depthwise"
    bias: bool = True


class NormOp(_Op):
    """GroupNorm on conv hosts (no running statistics to drift while α ramps), LayerNorm on
    linear hosts."""

    op: Literal["norm"] = "norm"
    groups: int = Field(default=8, ge=1, le=4096)


class ActOp(_Op):
    op: Literal["act"] = "act"
    fn: Literal["relu", "gelu", "silu", "tanh", "sigmoid"] = "relu"


class GLUOp(_Op):
    """out = a ⊙ σ(b) with [a, b] one projection of width 2·out."""

    op: Literal["glu"] = "glu"
    out: Size
    bias: bool = True

    def sizes(self) -> list[Size]:
        return [self.out]


class SqueezeExciteOp(_Op):
    """x ⊙ σ(W₂ relu(W₁ pool(x))), hidden width max(1, ratio·width)."""

    op: Literal["squeeze_excite"] = "squeeze_excite"
    ratio: float = Field(default=0.25, gt=0, le=1)


class ScaleOp(_Op):
    """A learnable per-channel scale."""

    op: Literal["scale"] = "scale"
    init: float = 1.0


class ResidualOp(_Op):
    """x + body(x); the body keeps the width and carries no host geometry."""

    op: Literal["residual"] = "residual"
    body: list[OpSpec] = Field(min_length=1)

    def sizes(self) -> list[Size]:
        return [s for op in self.body for s in op.sizes()]

    @property
    def conv_only(self) -> bool:
        return any(op.conv_only for op in self.body)


OpSpec = Annotated[
    ProjectOp
    | HostProjOp
    | NextProjOp
    | ConvOp
    | DepthwiseOp
    | NormOp
    | ActOp
    | GLUOp
    | SqueezeExciteOp
    | ScaleOp
    | ResidualOp,
    Field(discriminator="op"),
]
ResidualOp.model_rebuild()


def _count(ops: list[OpSpec]) -> int:
    return sum(1 + (_count(op.body) if isinstance(op, ResidualOp) else 0) for op in ops)


def _walk(ops: list[OpSpec], path: str = "body", depth: int = 0) -> list[tuple[str, OpSpec, int]]:
    """Every op with its location (`body[2].body[0] (conv)`) and its residual nesting depth."""
    found = []
    for index, op in enumerate(ops):
        where = f"{path}[{index}]"
        found.append((f"{where} ({op.op})", op, depth))
        if isinstance(op, ResidualOp):
            found.extend(_walk(op.body, f"{where}.body", depth + 1))
    return found


class BlueprintSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,63}$")
    version: int = Field(default=1, ge=1)
    description: str = Field(default="", max_length=500)
    hosts: list[HostKind] = Field(min_length=1)
    default_blend: Blend = "add"
    params: dict[str, float] = Field(default_factory=dict)
    body: list[OpSpec] = Field(min_length=1)
    widens: bool = False
    """A widening blueprint: its seeds read the host's input and add to the next layer's
    output — k new hidden units between the two; compiled only for a widening host."""

    @model_validator(mode="after")
    def _validate(self) -> BlueprintSpec:
        for pname in self.params:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", pname) or pname in RESERVED_NAMES:
                raise ValueError(f"param name {pname!r} is not an identifier or is reserved")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError("hosts lists a kind twice")
        if _count(self.body) > MAX_OPS:
            raise ValueError(f"more than {MAX_OPS} ops")
        names = {"in", "out", *(["mid"] if self.widens else []), *self.params}
        for where, op, depth in _walk(self.body):
            if not isinstance(op, ResidualOp):  # a residual's sizes are its body's, checked there
                for size in op.sizes():
                    try:
                        parse_size(size, names)
                    except BlueprintSpecError as err:
                        raise ValueError(f"{where}: {err}") from None
                if op.conv_only and "linear" in self.hosts:
                    raise ValueError(f"{where} needs a conv host but hosts include 'linear'")
            if depth and op.carries_geometry:
                raise ValueError(f"{where}: a residual body cannot carry the host's geometry")
            if depth and isinstance(op, NextProjOp):
                raise ValueError(f"{where}: a residual body cannot hold next_proj")
        self._check_next_proj()
        if "conv2d" in self.hosts or "conv1d" in self.hosts:
            geometry = [
                f"body[{i}] ({op.op})" for i, op in enumerate(self.body) if op.carries_geometry
            ]
            if len(geometry) != 1:
                before = " before its next_proj" if self.widens else ""
                raise ValueError(
                    "a conv blueprint needs exactly one top-level op with the host's geometry "
                    f"(host_proj, or conv/depthwise with kernel 'host'){before}; "
                    f"found {len(geometry)}" + (f": {', '.join(geometry)}" if geometry else "")
                )
        return self

    def _check_next_proj(self) -> None:
        """A widening body ends in its one next_proj (what maps to the next layer's output);
        a plain one has none. Nested ones were refused by the walk."""
        found = [
            f"body[{i}] (next_proj)" for i, op in enumerate(self.body) if isinstance(op, NextProjOp)
        ]
        if not self.widens:
            if found:
                raise ValueError(
                    f"{found[0]}: next_proj projects to the next layer; only a widening "
                    "blueprint (widens: true) may use it"
                )
            return
        if len(found) != 1 or not isinstance(self.body[-1], NextProjOp):
            raise ValueError(
                "a widening blueprint needs exactly one top-level next_proj, as its last op; "
                f"found {len(found)}" + (f": {', '.join(found)}" if found else "")
            )

    def canonical(self) -> dict[str, Any]:
        """The spec as JSON data for digests and kernel ids. `widens` is left out when false, so
        a plain spec hashes as it did before widening blueprints existed: its Urza digest (a
        changed one would refuse start-up on an existing store) and its kernel ids stay put."""
        data = self.model_dump(mode="json")
        if not self.widens:
            del data["widens"]
        return data

    @classmethod
    def parse(cls, data: object) -> BlueprintSpec:
        """Validate a dict (or JSON text) into a spec, raising BlueprintSpecError with the path."""
        try:
            if isinstance(data, str | bytes):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(_describe(e["loc"], e["msg"]) for e in err.errors())
            name = data.get("name") if isinstance(data, dict) else None
            label = (
                f"invalid blueprint spec {name!r}"
                if isinstance(name, str)
                else "invalid blueprint spec"
            )
            raise BlueprintSpecError(f"{label}: {problems}") from None


_OP_TAGS = {
    "project",
    "host_proj",
    "next_proj",
    "conv",
    "depthwise",
    "norm",
    "act",
    "glu",
    "squeeze_excite",
    "scale",
    "residual",
}


def _describe(loc: tuple[int | str, ...], msg: str) -> str:
    """A pydantic error location as `body[1] (conv).kernel`: list indices in brackets, and the
    op tag pydantic inserts after a list index shown as the op."""
    msg = msg.removeprefix("Value error, ")
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif i and isinstance(loc[i - 1], int) and part in _OP_TAGS:
            path += f" ({part})"
        else:
            path += f".{part}" if path else part
    return f"{path}: {msg}" if path else msg

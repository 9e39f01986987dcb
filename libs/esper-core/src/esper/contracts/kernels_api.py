"""Urza's API bodies: compile a blueprint for a host, upload a trained kernel with its lineage.

They are here rather than in the service so that a client (Tolaria's jobs, the CLI, a notebook)
builds requests with the same models the service validates them with.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from esper.contracts.kernels import HostSignature, KernelMeta
from esper.contracts.vocabulary import (
    Blend,
    BlueprintName,
    Digest,
    Identifier,
    KernelFormat,
    KernelId,
    KernelTag,
    Key,
)

KernelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CompileRequest(_Body):
    """`POST /kernels/compile`: the same blueprint (name and version), host and format always
    name the same kernel, so a repeat returns it without compiling again."""

    blueprint: BlueprintName
    blueprint_version: int | None = Field(default=None, ge=1, description="latest when null")
    host: HostSignature
    format: KernelFormat = "export"
    tags: list[KernelTag] = Field(default_factory=list, max_length=16)


class KernelLineage(_Body):
    """Where an uploaded kernel came from: the kernel it was trained from, in which job and
    layer, and what it measured there."""

    parent_kernel_id: KernelId | None = None
    job_id: Identifier | None = None
    layer: str | None = Field(default=None, min_length=1, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=1023)
    metrics: dict[Key, float] = Field(default_factory=dict, max_length=64)


class KernelUpload(_Body):
    """The `meta` part of `POST /kernels` (multipart; the `artifact` part holds the bytes).
    `digest`, when given, must match the bytes that arrive: a truncated upload is refused."""

    name: KernelName
    format: KernelFormat
    host: HostSignature
    blueprint: BlueprintName | None = None
    blueprint_version: int | None = Field(default=None, ge=1)
    default_blend: Blend = "add"
    digest: Digest | None = None
    lineage: KernelLineage = Field(default_factory=KernelLineage)
    tags: list[KernelTag] = Field(default_factory=list, max_length=16)

    def lineage_dict(self) -> dict[str, Any]:
        return self.lineage.model_dump(mode="json", exclude_none=True)


class KernelResult(_Body):
    """A kernel that a compile or an upload produced (`created`) or found already stored."""

    kernel: KernelMeta
    created: bool
    tags: list[KernelTag] = Field(default_factory=list)

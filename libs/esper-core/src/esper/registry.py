"""LocalKernelRegistry: kernels by id and by name in this process, optionally kept in a directory.

It is the kernel source of the library used alone (a notebook, a script): compile a blueprint for
a layer, tag it `efficiency_kernel_v1`, and `MorphableModel.load_kernel` resolves the name. On disk:
`blobs/<sha256>` (content-addressed bytes), `kernels/<kernel_id>.json`, `tags.json`, each written
atomically (temp file, then rename), so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from esper.blueprints.compiler import compile_blueprint
from esper.blueprints.spec import BlueprintSpec
from esper.contracts.kernels import HostSignature, KernelMeta
from esper.contracts.vocabulary import KERNEL_ID_RE, KernelFormat
from esper.exceptions import ConfigError, UnknownKernelError
from esper.files import atomic_write
from esper.kernels.artifact import KernelArtifact, verify
from esper.kernels.cache import KernelSource

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class LocalKernelRegistry(KernelSource):
    name = "local"

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._metas: dict[str, KernelMeta] = {}
        self._data: dict[str, bytes] = {}
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.root is not None:
            self._load_dir(self.root)

    def _load_dir(self, root: Path) -> None:
        for meta_file in sorted((root / "kernels").glob("krn_*.json")):
            meta = KernelMeta.model_validate_json(meta_file.read_bytes())
            self._metas[meta.kernel_id] = meta
        tags = root / "tags.json"
        if tags.exists():
            self._tags = {k: v for k, v in json.loads(tags.read_text()).items() if v in self._metas}

    # -------------------------------------------------------------- writing
    def publish(self, artifact: KernelArtifact, tags: Iterable[str] = ()) -> KernelMeta:
        """Store a kernel (its digest is checked first) and point `tags` at it."""
        verify(artifact)
        tags = list(tags)
        for tag in tags:
            self._check_tag(tag)
        meta = artifact.meta
        with self._lock:
            if self.root is not None:
                atomic_write(self._blob_path(meta), artifact.data)
                atomic_write(
                    self.root / "kernels" / f"{meta.kernel_id}.json",
                    meta.model_dump_json(indent=2).encode(),
                )
            self._metas[meta.kernel_id] = meta
            self._data[meta.kernel_id] = artifact.data
        for tag in tags:
            self.tag(tag, meta.kernel_id)
        return meta

    def compile(
        self,
        blueprint: BlueprintSpec | str,
        host: HostSignature | nn.Module,
        fmt: KernelFormat = "export",
        *,
        tags: Iterable[str] = (),
    ) -> KernelMeta:
        """Compile a blueprint for a host (a layer, or its signature) and publish the kernel."""
        return self.publish(compile_blueprint(blueprint, host, fmt), tags)

    def tag(self, tag: str, kernel_id: str) -> None:
        self._check_tag(tag)
        with self._lock:
            if kernel_id not in self._metas:
                raise UnknownKernelError(f"cannot tag {tag!r}: unknown kernel {kernel_id!r}")
            self._tags[tag] = kernel_id
            if self.root is not None:
                atomic_write(self.root / "tags.json", json.dumps(self._tags, indent=2).encode())

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or KERNEL_ID_RE.fullmatch(tag):
            raise ConfigError(
                f"tag {tag!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
                "and must not look like a kernel id"
            )

    # -------------------------------------------------------------- reading
    def lookup(self, ref: str) -> KernelMeta:
        kernel_id = self._tags.get(ref, ref)
        try:
            return self._metas[kernel_id]
        except KeyError:
            raise UnknownKernelError(f"unknown kernel {ref!r} in the local registry") from None

    def list(self, *, name: str | None = None, tag: str | None = None) -> list[KernelMeta]:
        metas = list(self._metas.values())
        if name is not None:
            metas = [m for m in metas if m.name == name]
        if tag is not None:
            metas = [m for m in metas if self._tags.get(tag) == m.kernel_id]
        return sorted(metas, key=lambda m: m.created_at)

    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    async def resolve(self, ref: str) -> str | None:
        kernel_id = self._tags.get(ref, ref)
        return kernel_id if kernel_id in self._metas else None

    async def fetch(self, kernel_id: str) -> KernelArtifact | None:
        meta = self._metas.get(kernel_id)
        if meta is None:
            return None
        data = self._data.get(kernel_id)
        if data is None and self.root is not None:
            data = self._blob_path(meta).read_bytes()
        return None if data is None else KernelArtifact(meta, data)

    def _blob_path(self, meta: KernelMeta) -> Path:
        assert self.root is not None
        return self.root / "blobs" / meta.digest.removeprefix("sha256:")


_default: LocalKernelRegistry | None = None


def default_registry() -> LocalKernelRegistry:
    """The process-wide registry `esper.wrap` uses when given no kernel source; kept in
    `$ESPER_KERNEL_DIR` when that is set, else in memory."""
    global _default
    if _default is None:
        _default = LocalKernelRegistry(os.environ.get("ESPER_KERNEL_DIR") or None)
    return _default

"""KernelCache: memory (LRU in bytes, deserialized modules) → the tiers behind it (Redis, HTTP, a
local registry), each a KernelSource. Misses of one kernel coalesce into one fetch; every artifact
is verified (digest, and HMAC when a key is set) and inspected (esper.kernels.inspection: only
tensor-math operators; TorchScript only when vouched for) before any of its code runs, and a bad
one is never cached."""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from esper._sync import run_sync
from esper.contracts.kernels import KernelMeta
from esper.contracts.vocabulary import KERNEL_ID_RE
from esper.exceptions import (
    ArtifactError,
    KernelFetchError,
    KernelUnreachableError,
    UnknownKernelError,
    is_transient,
)
from esper.kernels.artifact import KernelArtifact, verify
from esper.kernels.executor import deserialize

log = logging.getLogger(__name__)
MEMORY = "memory"


class KernelSource(ABC):
    """One tier behind the memory cache. `fetch` returns None (or raises UnknownKernelError) for a
    miss and raises anything else for a failure; the cache then asks the next tier."""

    name: str = "source"

    @abstractmethod
    async def resolve(self, ref: str) -> str | None:
        """The kernel id a name, tag or id refers to, or None when this tier does not know it."""

    @abstractmethod
    async def fetch(self, kernel_id: str) -> KernelArtifact | None: ...

    async def store(self, artifact: KernelArtifact) -> None:  # noqa: B027 - optional write-back
        """Keep a verified artifact fetched from a later tier (a Redis tier does; most do not)."""


@dataclass
class CachedKernel:
    meta: KernelMeta
    template: nn.Module  # never handed out: the executor clones it per seed
    nbytes: int


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    rejected: int = 0


def _module_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return max(1, sum(t.numel() * t.element_size() for t in tensors))


@dataclass
class KernelCache:
    sources: Sequence[KernelSource] = ()
    max_bytes: int = 256 << 20
    signing_key: bytes | None = None
    trust_torchscript: bool = False
    """Load TorchScript kernels nobody vouches for (`KernelMeta.vouched_by` unset). Their load
    runs code from the archive that cannot be inspected first: for kernels you made yourself."""
    _entries: OrderedDict[str, CachedKernel] = field(default_factory=OrderedDict, init=False)
    _bytes: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _inflight: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[CachedKernel]]] = field(
        default_factory=dict, init=False
    )
    _stats: dict[str, TierStats] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._stats = {MEMORY: TierStats(), **{s.name: TierStats() for s in self.sources}}

    # --------------------------------------------------------------- lookup
    async def resolve(self, ref: str) -> str:
        """The kernel id `ref` (an id, a name or a tag) refers to. An id is its own answer (tags
        never look like ids), so loading by id costs no lookup round trip; fetching it says
        whether a tier has it. A tier that fails is skipped; when none knows a name and some
        failed, that is a KernelFetchError, not an unknown name (KernelUnreachableError when a
        tier could not be reached, so that asking again later may work)."""
        if KERNEL_ID_RE.fullmatch(ref):
            return ref
        failures = []
        unreachable = False
        for source in self.sources:
            try:
                kernel_id = await source.resolve(ref)
            except UnknownKernelError:
                continue
            except Exception as err:
                self._stats[source.name].errors += 1
                failures.append(f"{source.name}: {type(err).__name__}: {err}")
                unreachable = unreachable or is_transient(err)
                log.warning("tier %s could not resolve %r: %s", source.name, ref, err)
                continue
            if kernel_id:
                return kernel_id
        if failures:
            raise (KernelUnreachableError if unreachable else KernelFetchError)(
                f"cannot resolve kernel {ref!r}: no tier knows it and some failed: "
                + "; ".join(failures)
            )
        tiers = ", ".join(s.name for s in self.sources) or "no tiers configured"
        raise UnknownKernelError(f"unknown kernel {ref!r} (looked in: {tiers})")

    async def get(self, ref: str) -> CachedKernel:
        """The cached kernel for `ref`; concurrent misses of one kernel share one fetch. The fetch
        runs as its own task, so a caller that is cancelled does not cancel it for the others."""
        kernel_id = await self.resolve(ref)
        entry = self._hit(kernel_id)
        if entry is not None:
            return entry
        loop = asyncio.get_running_loop()
        waiting = self._inflight.get(kernel_id)
        if waiting is not None and waiting[0] is loop:
            return await asyncio.shield(waiting[1])
        task = loop.create_task(self._fetch(kernel_id))
        inflight = (loop, task)
        self._inflight[kernel_id] = inflight

        def done(finished: asyncio.Future[CachedKernel]) -> None:
            if self._inflight.get(kernel_id) is inflight:
                del self._inflight[kernel_id]
            if not finished.cancelled():
                finished.exception()  # retrieved, so a fetch nobody awaits any more does not warn

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def get_sync(self, ref: str) -> CachedKernel:
        if KERNEL_ID_RE.fullmatch(ref) and ref in self:
            entry = self._hit(ref)
            if entry is not None:
                return entry
        return run_sync(self.get(ref))

    def put(self, artifact: KernelArtifact) -> CachedKernel:
        """Verify, deserialize and keep an artifact made in this process (a local compile)."""
        verify(artifact, self.signing_key)
        template = deserialize(artifact, trust_torchscript=self.trust_torchscript)
        return self._insert(artifact.meta, template)

    # -------------------------------------------------------------- tiers
    async def _fetch(self, kernel_id: str) -> CachedKernel:
        """Ask each tier in turn. A tier that fails, or whose artifact is refused (wrong id, digest
        or signature; not loadable), is counted and the next tier is asked; a refused artifact is
        never cached. When no tier delivers: the first refusal's error (typed) if there was one,
        else KernelFetchError naming each failed tier (KernelUnreachableError when one of them
        could not be reached), else UnknownKernelError."""
        failures: list[str] = []
        unreachable = False
        refused: ArtifactError | None = None
        for index, source in enumerate(self.sources):
            stats = self._stats[source.name]
            try:
                artifact = await source.fetch(kernel_id)
            except UnknownKernelError:
                artifact = None
            except ArtifactError as err:  # the tier itself saw the bytes were not the kernel
                stats.rejected += 1
                failures.append(f"{source.name}: refused: {err}")
                refused = refused or err
                continue
            except Exception as err:
                stats.errors += 1
                failures.append(f"{source.name}: {type(err).__name__}: {err}")
                unreachable = unreachable or is_transient(err)
                log.warning("tier %s failed to fetch %s: %s", source.name, kernel_id, err)
                continue
            if artifact is None:
                stats.misses += 1
                continue
            stats.hits += 1
            try:
                if artifact.meta.kernel_id != kernel_id:
                    raise ArtifactError(
                        f"tier {source.name} returned kernel {artifact.meta.kernel_id} "
                        f"when asked for {kernel_id}"
                    )
                verify(artifact, self.signing_key)
                template = await asyncio.to_thread(
                    partial(deserialize, trust_torchscript=self.trust_torchscript), artifact
                )
            except ArtifactError as err:
                stats.rejected += 1
                failures.append(f"{source.name}: refused: {err}")
                log.warning("tier %s: refused kernel %s: %s", source.name, kernel_id, err)
                refused = refused or err
                continue
            for earlier in self.sources[:index]:
                try:
                    await earlier.store(artifact)
                except Exception as err:  # a write-back is an optimisation, never a failure
                    log.warning("tier %s could not keep %s: %s", earlier.name, kernel_id, err)
            return self._insert(artifact.meta, template)
        if refused is not None:
            if len(failures) == 1:
                raise refused
            raise type(refused)(f"{refused} (every tier failed: {'; '.join(failures)})") from None
        if failures:
            # A refusal above says the bytes are bad wherever they come from; without one, a
            # tier that could not be reached may still have served the kernel.
            raise (KernelUnreachableError if unreachable else KernelFetchError)(
                f"kernel {kernel_id}: every tier failed: {'; '.join(failures)}"
            )
        tiers = ", ".join([MEMORY, *(s.name for s in self.sources)])
        raise UnknownKernelError(f"kernel {kernel_id} is in no cache tier ({tiers})")

    # ------------------------------------------------------------- memory
    def _hit(self, kernel_id: str) -> CachedKernel | None:
        with self._lock:
            entry = self._entries.get(kernel_id)
            if entry is None:
                self._stats[MEMORY].misses += 1
                return None
            self._entries.move_to_end(kernel_id)
            self._stats[MEMORY].hits += 1
            return entry

    def _insert(self, meta: KernelMeta, template: nn.Module) -> CachedKernel:
        entry = CachedKernel(meta, template, _module_bytes(template))
        if entry.nbytes > self.max_bytes:
            return entry  # larger than the whole cache: served, not kept
        with self._lock:
            old = self._entries.pop(meta.kernel_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[meta.kernel_id] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        return entry

    def __contains__(self, kernel_id: object) -> bool:
        with self._lock:
            return kernel_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: dict(vars(s)) for name, s in self._stats.items()}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

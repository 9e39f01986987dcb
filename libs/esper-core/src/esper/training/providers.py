"""Kernel providers: where a SeedOrchestrator gets a kernel for a blueprint and a host layer.

The orchestrator only needs a kernel id that the model's KernelCache can load. A provider hides
whether that id came from compiling in this process (LocalKernelProvider, for library users and
tests) or from asking Urza over HTTP (written against the same protocol in Tolaria), so the
orchestrator never depends on the network or on Redis.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol, runtime_checkable

from esper.blueprints.compiler import compile_kernel_id
from esper.blueprints.library import get_blueprint
from esper.blueprints.spec import BlueprintSpec
from esper.contracts.kernels import HostSignature
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import UnknownKernelError
from esper.registry import LocalKernelRegistry


@runtime_checkable
class KernelProvider(Protocol):
    """Turns (blueprint, host signature, format) into a loadable kernel id.

    Same input, same kernel id: asking twice must not compile twice where the implementation can
    avoid it. Errors (unknown blueprint, a blueprint that does not serve this kind of host, a
    compile failure, an unreachable registry) are raised; the orchestrator turns them into a
    refused decision.
    """

    async def kernel_for(self, blueprint: str, host: HostSignature, fmt: KernelFormat) -> str: ...


class LocalKernelProvider:
    """Compiles blueprints into a LocalKernelRegistry in this process.

    Compiling (torch.export, validation, timing) takes from a fraction of a second to seconds, so
    it runs in a worker thread and the event loop stays responsive. A kernel already in the
    registry is returned without compiling: its id is a hash of (blueprint, host, format,
    compiler and torch versions), so it can be computed up front.
    """

    def __init__(self, registry: LocalKernelRegistry) -> None:
        self.registry = registry
        # One lock per kernel id: concurrent misses for the same kernel compile it once, while
        # different kernels still compile in parallel. Threading locks, not asyncio ones, because
        # the work happens in worker threads and callers may come from different event loops.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.compiled = 0  # kernels this provider compiled (the rest were found in the registry)

    async def kernel_for(self, blueprint: str, host: HostSignature, fmt: KernelFormat) -> str:
        spec = get_blueprint(blueprint)  # unknown names fail here, before a thread is used
        kernel_id = compile_kernel_id(spec, host, fmt)
        if self._known(kernel_id):
            return kernel_id
        return await asyncio.to_thread(self._compile, spec, host, fmt, kernel_id)

    def _known(self, kernel_id: str) -> bool:
        try:
            self.registry.lookup(kernel_id)
        except UnknownKernelError:
            return False
        return True

    def _compile(
        self, spec: BlueprintSpec, host: HostSignature, fmt: KernelFormat, kernel_id: str
    ) -> str:
        with self._locks_guard:
            lock = self._locks.setdefault(kernel_id, threading.Lock())
        try:
            with lock:
                if self._known(kernel_id):  # another caller compiled it while this one waited
                    return kernel_id
                meta = self.registry.compile(spec, host, fmt)
                self.compiled += 1
                return meta.kernel_id
        finally:
            # A caller arriving after this finds the kernel in the registry (or, after a failed
            # compile, makes a fresh lock and tries again): the lock need not outlive the call.
            with self._locks_guard:
                if self._locks.get(kernel_id) is lock:
                    del self._locks[kernel_id]

"""Turning requests into stored kernels: compiles of registered blueprints, and uploads of
trained kernels. Both run their torch work in a thread pool off the event loop, store the kernel
only once it is complete and checked, and announce every new kernel with `kernel.ready`.

The same compile input always names the same kernel id, so a repeat is a lookup; concurrent
requests for one kernel that is still compiling share the one compile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints.builder import check_host, host_for
from esper.blueprints.compiler import compile_blueprint, compile_kernel_id
from esper.blueprints.spec import BlueprintSpec
from esper.contracts import CompileRequest, HostSignature, KernelMeta, KernelResult, KernelUpload
from esper.exceptions import (
    CorruptArtifactError,
    DigestMismatchError,
    EsperError,
)
from esper.kernels.artifact import KernelArtifact, digest_of, kernel_id_for
from esper.kernels.executor import KernelExecutor, deserialize, probe_input
from esper.kernels.inspection import is_torchscript_archive
from urza.budget import (
    CompileEstimate,
    check_budget,
    check_compile_budget,
    estimate_export_upload,
    estimate_loaded_upload,
)
from urza.errors import AdminTokenRequiredError
from urza.store import KernelStore

log = logging.getLogger("urza.compiler")

T = TypeVar("T")
Announce = Callable[[KernelMeta, list[str]], Coroutine[Any, Any, None]]


class QueueFullError(EsperError):
    """More compiles are waiting than `max_queued_compiles` allows."""


class KernelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.created = Counter(
            "esper_urza_kernels_created",
            "Kernels stored, by how they arrived (compiled or uploaded) and format",
            ["origin", "format"],
            registry=registry,
        )
        self.failures = Counter(
            "esper_urza_kernel_failures",
            "Compiles and uploads refused or failed, by operation",
            ["operation"],
            registry=registry,
        )
        self.compile_seconds = Histogram(
            "esper_urza_compile_duration_seconds",
            "Time to compile, validate and measure one kernel",
            ["format"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queued = Gauge(
            "esper_urza_compile_queue_depth", "Compiles waiting or running", registry=registry
        )


class CompileService:
    def __init__(
        self,
        store: KernelStore,
        *,
        signing_key: bytes | None,
        workers: int,
        max_queued: int,
        announce: Announce,
        metrics: KernelMetrics,
        max_kernel_params: int | None = None,
        max_kernel_memory_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.max_kernel_params = max_kernel_params
        self.max_kernel_memory_bytes = max_kernel_memory_bytes
        self.signing_key = signing_key
        self.max_queued = max_queued
        self.announce = announce
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="urza-compile")
        self._inflight: dict[str, asyncio.Future[KernelMeta]] = {}
        self._pending = 0
        self._announcing: set[asyncio.Task[None]] = set()

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # --------------------------------------------------------------- compile
    async def compile(self, request: CompileRequest) -> KernelResult:
        record = await asyncio.to_thread(
            self.store.get_blueprint, request.blueprint, request.blueprint_version
        )
        spec = record.spec
        host = host_for(spec, request.host)  # a plain blueprint offered a widening host
        check_host(spec, host)
        kernel_id = compile_kernel_id(spec, host, request.format)
        created = False
        if not await asyncio.to_thread(self.store.has_kernel, kernel_id):
            if kernel_id not in self._inflight:
                await self._check_budget(spec, host)
            # Read after the budget check's await: an identical request may have queued the
            # compile meanwhile, and it must be joined, not compiled twice.
            waiting = self._inflight.get(kernel_id)
            if waiting is None:
                if self._pending >= self.max_queued:
                    raise QueueFullError(
                        f"{self._pending} compiles are already queued (limit {self.max_queued})"
                    )
                waiting = asyncio.ensure_future(self._compile(kernel_id, spec, host, request))
                self._inflight[kernel_id] = waiting
                waiting.add_done_callback(lambda _: self._inflight.pop(kernel_id, None))
                created = True
            await asyncio.shield(waiting)
        return await self._result(kernel_id, request.tags, created)

    @property
    def _budget(self) -> tuple[int, int] | None:
        """(parameters, bytes), or None when neither is limited."""
        if self.max_kernel_params is None and self.max_kernel_memory_bytes is None:
            return None
        params = self.max_kernel_params if self.max_kernel_params is not None else 1 << 62
        memory = self.max_kernel_memory_bytes
        return params, memory if memory is not None else 1 << 62

    async def _check_budget(self, spec: BlueprintSpec, host: HostSignature) -> None:
        """Refuse, before it is queued, a compile whose kernel would not fit the budget."""
        if (budget := self._budget) is not None:
            await asyncio.to_thread(check_compile_budget, spec, host, *budget)

    def _check_upload_budget(self, upload: KernelUpload, estimate: CompileEstimate | None) -> None:
        budget = self._budget
        if budget is not None and estimate is not None:
            where = f"uploaded kernel {upload.name!r} ({upload.format})"
            check_budget(estimate, where, *budget, upload=True)

    async def _compile(
        self, kernel_id: str, spec: BlueprintSpec, host: HostSignature, request: CompileRequest
    ) -> KernelMeta:
        self._pending += 1
        self.metrics.queued.set(self._pending)
        start = time.perf_counter()
        try:
            artifact = await self._in_pool(
                lambda: compile_blueprint(spec, host, request.format, signing_key=self.signing_key)
            )
            assert artifact.meta.kernel_id == kernel_id
            meta, created = await asyncio.to_thread(self.store.put_kernel, artifact)
        except Exception:
            self.metrics.failures.labels("compile").inc()
            raise
        finally:
            self._pending -= 1
            self.metrics.queued.set(self._pending)
        self.metrics.compile_seconds.labels(request.format).observe(time.perf_counter() - start)
        if created:
            self.metrics.created.labels("compiled", request.format).inc()
            log.info("compiled %s (%s, %s)", kernel_id, spec.name, request.format)
        return meta

    # ---------------------------------------------------------------- upload
    async def upload(
        self, upload: KernelUpload, data: bytes, *, admin: bool = False
    ) -> KernelResult:
        """`admin`: the uploader holds the admin token (URZA_ADMIN_TOKEN)."""
        try:
            artifact = await self._in_pool(lambda: self._checked_upload(upload, data, admin))
            meta, created = await asyncio.to_thread(self.store.put_kernel, artifact)
        except Exception:
            self.metrics.failures.labels("upload").inc()
            raise
        if created:
            self.metrics.created.labels("uploaded", upload.format).inc()
            log.info("stored uploaded kernel %s (%s)", meta.kernel_id, upload.name)
        return await self._result(meta.kernel_id, upload.tags, created)

    def _checked_upload(self, upload: KernelUpload, data: bytes, admin: bool) -> KernelArtifact:
        """Refuse bytes that are not what the client meant (digest), a program that does more
        than tensor math (esper.kernels.inspection, before any of it runs), a format that runs
        code at load from an uploader without the admin token, a kernel over the parameter or
        memory budget (urza.budget, before its forward runs), or a kernel that does not fit its
        host (a probe forward must give the host's output shape)."""
        digest = digest_of(data)
        if upload.digest is not None and upload.digest != digest:
            raise DigestMismatchError(
                f"the uploaded artifact has digest {digest} ({len(data)} bytes), "
                f"not the declared {upload.digest}"
            )
        if upload.format == "torchscript" and not admin:
            if not is_torchscript_archive(data):
                raise CorruptArtifactError("the uploaded artifact is not a TorchScript archive")
            raise AdminTokenRequiredError(
                "TorchScript runs code from the archive (__setstate__) while it loads, before it "
                "can be inspected, so only an uploader holding Urza's admin token (header "
                "X-Esper-Admin-Token, set by URZA_ADMIN_TOKEN) may upload it; upload a "
                "torch.export program instead"
            )
        kernel_id = kernel_id_for(
            {
                "upload": digest,
                "name": upload.name,
                "format": upload.format,
                "host": upload.host.model_dump(mode="json"),
            }
        )
        meta = KernelMeta(
            kernel_id=kernel_id,
            name=upload.name,
            format=upload.format,
            host=upload.host,
            digest=digest,
            size_bytes=len(data),
            blueprint=upload.blueprint,
            blueprint_version=upload.blueprint_version,
            default_blend=upload.default_blend,
            lineage=upload.lineage_dict(),
            vouched_by="admin" if admin else None,
        )
        if upload.format == "export":
            # Declared sizes, read before the program's tensors are built.
            self._check_upload_budget(upload, estimate_export_upload(data))
        template = deserialize(KernelArtifact(meta, data))
        if upload.format == "torchscript":
            self._check_upload_budget(upload, estimate_loaded_upload(template))
        # A widening host is probed with its two layers: the kernel must give their output.
        host = upload.host
        downstream = host.downstream.reference_module() if host.downstream is not None else None
        module = KernelExecutor().prepare(
            template,
            host.layer.reference_module(),
            kernel_id,
            "upload",
            downstream_layer=downstream,
        )
        probe = probe_input(upload.host, batch=1)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(probe)
        meta = meta.model_copy(
            update={
                "params": sum(p.numel() for p in module.parameters()),
                "flops": int(counter.get_total_flops()),
            }
        )
        artifact = KernelArtifact(meta, data)
        return artifact.signed(self.signing_key) if self.signing_key else artifact

    # ---------------------------------------------------------------- shared
    async def _result(self, kernel_id: str, tags: list[str], created: bool) -> KernelResult:
        def tag_and_read() -> tuple[KernelMeta, list[str]]:
            for tag in tags:
                self.store.set_tag(tag, kernel_id)
            return self.store.get_kernel(kernel_id), self.store.tags_of(kernel_id)

        meta, all_tags = await asyncio.to_thread(tag_and_read)
        if created:
            # The kernel is stored whatever happens to the event: announce in the background.
            task = asyncio.get_running_loop().create_task(self.announce(meta, all_tags))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)
        return KernelResult(kernel=meta, created=created, tags=all_tags)

    async def close(self) -> None:
        if self._announcing:
            await asyncio.wait(self._announcing, timeout=5.0)
        self._pool.shutdown(wait=True, cancel_futures=True)

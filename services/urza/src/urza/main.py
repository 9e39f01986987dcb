"""Builds Urza's app: the service kit, the store and the compile service, the routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.contracts import Envelope, KernelMeta, KernelReady
from esper.service import create_app as create_service_app
from urza import __version__
from urza.api.errors import ERRORS
from urza.api.routes import blueprints, kernels
from urza.compiler import CompileService, KernelMetrics
from urza.settings import UrzaSettings
from urza.store import KernelStore

log = logging.getLogger("urza")
SERVICE = "urza"


def create_app(settings: UrzaSettings | None = None) -> FastAPI:
    settings = settings or UrzaSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await asyncio.to_thread(KernelStore, settings.data_dir)
        for spec in BUILTIN_BLUEPRINTS.values():
            await asyncio.to_thread(store.put_blueprint, spec, builtin=True)

        async def announce(meta: KernelMeta, tags: list[str]) -> None:
            event = Envelope.wrap(KernelReady.from_meta(meta, tags), source=SERVICE)
            try:
                await app.state.producer.publish(event)
            except Exception as err:  # the kernel is stored; only the announcement is lost
                log.error("kernel.ready for %s not published: %s", meta.kernel_id, err)

        key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        app.state.store = store
        app.state.compiler = CompileService(
            store,
            signing_key=key,
            workers=settings.compile_workers,
            max_queued=settings.max_queued_compiles,
            announce=announce,
            metrics=KernelMetrics(app.state.registry),
            max_kernel_params=settings.max_kernel_params,
            max_kernel_memory_bytes=settings.max_kernel_memory_bytes,
        )
        log.info("urza store at %s: %s", settings.data_dir, store.counts())
        try:
            yield
        finally:
            await app.state.compiler.close()
            store.close()

    app = create_service_app(
        service=SERVICE,
        version=__version__,
        settings=settings,
        routers=[blueprints.router, kernels.router],
        lifespan=lifespan,
        body_limits={"/kernels": settings.max_upload_bytes},
        errors=ERRORS,
        description="Blueprint registry, kernel compiler and kernel registry.",
    )
    return app

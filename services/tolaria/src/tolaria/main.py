"""Builds Tolaria's app: the service kit, the job store in Redis, the workers, the routers."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from esper.bus import connect
from esper.contracts.api import Check
from esper.exceptions import ConfigError
from esper.service import create_app as create_service_app
from tolaria import __version__, usercode_submit
from tolaria.api.errors import ERRORS
from tolaria.api.routes import jobs, runs
from tolaria.external import RunRelay, sweep_forever
from tolaria.jobstore import JobStore
from tolaria.settings import TolariaSettings
from tolaria.worker import Worker

log = logging.getLogger("tolaria")
SERVICE = "tolaria"


def create_app(settings: TolariaSettings | None = None) -> FastAPI:
    settings = settings or TolariaSettings()
    if settings.executor == "ray" and importlib.util.find_spec("ray") is None:
        # Refused at start, not job by job: every job would fail the same way.
        raise ConfigError("TOLARIA_EXECUTOR=ray needs Ray Train: pip install 'esper-tolaria[ray]'")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.bus)
        store = JobStore(
            redis,
            settings.bus.prefix,
            max_events=settings.max_events,
            max_log_lines=settings.max_log_lines,
        )
        app.state.jobs = store
        workers = [Worker(settings, store, i) for i in range(settings.workers)]
        app.state.workers = workers
        for worker in workers:
            worker.start()
        relay = RunRelay(store, app.state.producer, settings)
        sweeper = asyncio.ensure_future(sweep_forever(relay, settings.external_sweep_s))
        log.info("tolaria: %d workers, data in %s", len(workers), settings.data_dir)
        try:
            yield
        finally:
            sweeper.cancel()
            for worker in workers:
                await worker.stop()
            await redis.aclose()

    async def workers_alive(app: FastAPI) -> Check:
        dead = [w.consumer.name for w in app.state.workers if not w.consumer.running]
        return True if not dead else f"workers not running: {', '.join(dead)}"

    app = create_service_app(
        service=SERVICE,
        version=__version__,
        settings=settings,
        routers=[jobs.router, runs.router],
        lifespan=lifespan,
        readiness={"workers": workers_alive},
        errors=ERRORS,
        body_limits={"/jobs": usercode_submit.body_limit(settings)},
        description="Training jobs: submit, follow, stop, download checkpoints.",
    )
    return app

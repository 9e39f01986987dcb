"""Builds Nissa's app: the service kit, the state and its collector, the consumers, the bus
watch, the housekeeping, the routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from esper.contracts.api import Check
from esper.service import create_app as create_service_app
from nissa import __version__
from nissa.api.routes import health, reports
from nissa.buswatch import BusWatch
from nissa.consumer import consumers
from nissa.keeper import Keeper
from nissa.kernels import KernelLookup
from nissa.metrics import Exposition
from nissa.reports import ReportStore
from nissa.settings import NissaSettings
from nissa.state import NissaState

log = logging.getLogger("nissa")
SERVICE = "nissa"


async def consumers_check(app: FastAPI) -> Check:
    """Ready while both consumers run and hold a connection to Redis."""
    running = getattr(app.state, "consumers", [])
    if not running:
        return "consumers not started"
    for consumer in running:
        if not consumer.running:
            return f"consumer of {', '.join(consumer.topics)} is not running"
        if not consumer.connected:
            return f"consumer of {', '.join(consumer.topics)} has lost Redis"
    return True


def create_app(settings: NissaSettings | None = None) -> FastAPI:
    settings = settings or NissaSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: NissaState = app.state.nissa
        store = ReportStore(
            settings.data_dir / "reports",
            retention_s=settings.report_retention_s,
            max_reports=settings.max_reports,
        )
        app.state.reports = store
        keeper = Keeper(state, store)
        await keeper.restore()
        watch = BusWatch(state, settings.bus, settings.bus_poll_interval_s, settings.lag_count_cap)
        await watch.start()  # the dead-letter baseline is taken before anything is consumed
        lookup = None
        urza = settings.urza_client()
        if urza is not None:
            lookup = KernelLookup(state, urza)
            lookup.start()
        keeper.start()
        app.state.consumers = consumers(state, settings.bus, settings.group)
        for consumer in app.state.consumers:
            consumer.start()
        app.state.watch = watch
        log.info("nissa consuming %s as group %s", ", ".join(settings.bus.topics), settings.group)
        try:
            yield
        finally:
            for consumer in app.state.consumers:
                await consumer.close()
            await watch.stop()
            if lookup is not None:
                await lookup.stop()
            await keeper.stop()

    app = create_service_app(
        service=SERVICE,
        version=__version__,
        settings=settings,
        routers=[health.router, reports.router],
        lifespan=lifespan,
        readiness={"consumers": consumers_check},
        description="Observability: Prometheus metrics, service health and job reports.",
    )
    # The state exists before the lifespan runs, so /metrics never misses Nissa's families.
    app.state.nissa = NissaState(settings)
    _serve_metrics(app, Exposition(app.state.nissa))
    return app


def _serve_metrics(app: FastAPI, exposition: Exposition) -> None:
    """`/metrics`: the kit's registry (process and HTTP metrics), then Nissa's own text.

    The kit's route formats every sample of its registry on every scrape; Nissa's job series
    are rendered incrementally (metrics.py), so Nissa serves the path itself, with a route put
    in front of the kit's (routes match in order; the kit's stays in the OpenAPI document).
    """
    registry = app.state.registry

    async def metrics() -> Response:
        body = generate_latest(registry) + exposition.render().encode()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    route = APIRoute("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.router.routes.insert(0, route)

"""Builds Tamiyo's app: the service kit, the store in Redis, the controller, the routers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from esper.bus import connect
from esper.contracts.api import Check
from esper.policy import HeuristicPolicy, Policy
from esper.service import create_app as create_service_app
from tamiyo import __version__
from tamiyo.api.errors import ERRORS
from tamiyo.api.routes import decisions, jobs
from tamiyo.api.routes import policy as policy_routes
from tamiyo.catalogue import Catalogue
from tamiyo.controller import Controller
from tamiyo.settings import TamiyoSettings
from tamiyo.store import TamiyoStore

log = logging.getLogger("tamiyo")
SERVICE = "tamiyo"


def create_app(settings: TamiyoSettings | None = None, policy: Policy | None = None) -> FastAPI:
    """`policy`: the decision maker (the heuristic one unless a learned one is passed)."""
    settings = settings or TamiyoSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.bus)
        store = TamiyoStore(
            redis,
            settings.bus,
            settings.policy,
            state_ttl_s=settings.state_ttl_s,
            max_decisions=settings.max_decisions,
            max_job_decisions=settings.max_job_decisions,
        )
        catalogue = Catalogue(settings.urza_client(), ttl_s=settings.catalogue_ttl_s)
        controller = Controller(
            settings, store, catalogue, policy or HeuristicPolicy(), registry=app.state.registry
        )
        app.state.store = store
        app.state.controller = controller
        # What start-up imported (torch, through esper: ~200k objects) lives as long as the
        # process. Frozen, a full garbage collection no longer walks it, and no longer stalls a
        # decision for ~100 ms now and then.
        gc.freeze()
        controller.start()
        log.info("tamiyo: policy %s, blueprints from %s", controller.policy.name, settings.urza_url)
        try:
            yield
        finally:
            await controller.stop()
            await catalogue.aclose()
            await redis.aclose()

    async def consumer_alive(app: FastAPI) -> Check:
        consumer = app.state.controller.consumer
        if not consumer.running:
            return "the telemetry/events consumer is not running"
        return True if consumer.connected else "the consumer has lost Redis"

    app = create_service_app(
        service=SERVICE,
        version=__version__,
        settings=settings,
        routers=[decisions.router, jobs.router, policy_routes.router],
        lifespan=lifespan,
        readiness={"consumer": consumer_alive},
        errors=ERRORS,
        description="The adaptation controller: decides germinate / keep / retire per job.",
    )
    return app

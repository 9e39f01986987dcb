"""The app factory every service is built with.

It adds what every service has the same way: `/healthz` (the process is alive), `/readyz` (Redis
and the service's own checks pass: 200, else 503), `/metrics` (Prometheus text), the one error
shape, a request body limit, request metrics and logs, a bus producer on `app.state.producer`, and
a heartbeat on the health topic. The service brings its routers, its lifespan and its checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from esper.bus.producer import Producer
from esper.contracts.api import Check, ErrorBody, HealthStatus, Readiness
from esper.service.errors import ErrorTable, install_error_handlers, install_error_table
from esper.service.heartbeat import HeartbeatPublisher
from esper.service.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestMetrics
from esper.service.settings import ServiceSettings

ReadinessCheck = Callable[[FastAPI], Awaitable[Check]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
PROBE_TIMEOUT_S = 1.0


async def redis_check(app: FastAPI) -> Check:
    producer: Producer = app.state.producer
    try:
        await asyncio.wait_for(producer.redis.ping(), PROBE_TIMEOUT_S)
    except Exception as err:
        return f"redis unreachable: {type(err).__name__}: {err}"[:500]
    return True


async def run_checks(app: FastAPI) -> dict[str, Check]:
    checks: Mapping[str, ReadinessCheck] = app.state.readiness
    names = list(checks)

    async def run(check: ReadinessCheck) -> Check:
        # The check's coroutine is made only once its task runs: made up front, a gather
        # cancelled before the tasks start (the heartbeat stopping) leaves it never awaited.
        return await asyncio.wait_for(check(app), PROBE_TIMEOUT_S * 2)

    results = await asyncio.gather(*(run(checks[n]) for n in names), return_exceptions=True)
    return {
        name: result if isinstance(result, (bool, str)) else f"check failed: {result!r}"[:500]
        for name, result in zip(names, results, strict=True)
    }


def create_app(
    *,
    service: str,
    version: str,
    settings: ServiceSettings,
    routers: Sequence[APIRouter] = (),
    lifespan: Lifespan | None = None,
    readiness: Mapping[str, ReadinessCheck] | None = None,
    body_limits: Mapping[str, int] | None = None,
    errors: ErrorTable | None = None,
    description: str = "",
) -> FastAPI:
    """`body_limits` raises (or lowers) the body limit of single paths, e.g. an upload route;
    `errors` answers the service's own exceptions (see errors.py). Routes take `settings` back
    through `settings_dependency` (deps.py)."""

    @asynccontextmanager
    async def kit_lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.producer = Producer(settings.bus)
        heartbeat = HeartbeatPublisher(
            app.state.producer,
            service,
            settings.instance,
            settings.heartbeat_interval_s,
            lambda: run_checks(app),
        )
        app.state.heartbeat = heartbeat
        try:
            async with lifespan(app) if lifespan is not None else nullcontext():
                if settings.heartbeat:
                    heartbeat.start()
                try:
                    yield
                finally:
                    await heartbeat.stop()
        finally:
            await app.state.producer.close()

    app = FastAPI(title=service, version=version, description=description, lifespan=kit_lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.version = version
    app.state.readiness = {"redis": redis_check, **(readiness or {})}
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    app.state.registry = registry

    _json_error_docs(app)
    install_error_handlers(app)
    install_error_table(app, errors or {})
    app.add_middleware(MetricsMiddleware, metrics=RequestMetrics(registry, service))
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, per_path=dict(body_limits or {})
    )
    app.include_router(_probes())
    for router in routers:
        app.include_router(router)
    return app


def _json_error_docs(app: FastAPI) -> None:
    """Document every error answer as the JSON it is. FastAPI files an error model of a route
    whose response class is text (an HTML report, plain-text logs) under that text media type,
    while the error handlers answer those routes with JSON like every other. Operations behind
    RequireToken (marked by its security scheme) get its 401 and 403."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_errors(build())
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(document: dict[str, Any]) -> None:
    components = document.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" not in components:
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorBody"] = body
    error_json = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            if operation.get("security"):
                for code in ("401", "403"):
                    phrase = HTTPStatus(int(code)).phrase
                    answers.setdefault(code, {"description": phrase, "content": dict(error_json)})
            for code, answer in answers.items():
                content = answer.get("content")
                if str(code)[:1] in "45" and content and "application/json" not in content:
                    schema = next(iter(content.values())).get("schema", {})
                    answer["content"] = {"application/json": {"schema": schema}}


def _probes() -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", response_model=HealthStatus)
    async def healthz(request: Request) -> HealthStatus:
        state = request.app.state
        return HealthStatus(status="ok", service=state.service, version=state.version)

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> JSONResponse:
        state = request.app.state
        result = Readiness.of(state.service, state.version, await run_checks(request.app))
        status = 200 if result.status == "ready" else 503
        return JSONResponse(result.model_dump(mode="json"), status_code=status)

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

    return router

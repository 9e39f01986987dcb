"""ASGI middleware of every service: a request body limit, and request metrics and logs."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from esper.contracts.api import ErrorBody

log = logging.getLogger("esper.service.access")


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413: up front from Content-Length, and while reading
    for chunked bodies, so an unbounded upload never fills the service's memory."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared), limit)
            return
        seen = 0
        started = False
        exceeded = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                # The app's answer to a body it could not read: FastAPI turns the _TooLarge
                # raised while it reads a model body into a 400. The 413 below replaces it.
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, tracking_send)
        if exceeded and not started:
            await self._refuse(send, seen, limit)

    @staticmethod
    async def _refuse(send: Send, size: int, limit: int) -> None:
        body = (
            ErrorBody.of(
                "payload_too_large",
                f"request body of at least {size} bytes is over the limit of {limit} bytes",
                ["body"],
                limit_bytes=limit,
            )
            .model_dump_json()
            .encode()
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count and time requests by route template (bounded labels), and log one line each."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.requests = Counter(
            "esper_http_requests",
            "HTTP requests served, by route template and status code",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "esper_http_request_duration_seconds",
            "HTTP request handling time",
            ["service", "method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "GET")
        self.requests.labels(self.service, method, template, str(status)).inc()
        self.duration.labels(self.service, method, template).observe(seconds)
        level = logging.DEBUG if template in ("/healthz", "/readyz", "/metrics") else logging.INFO
        log.log(
            level,
            "%s %s %d %.1f ms",
            method,
            scope.get("path", ""),
            status,
            seconds * 1000,
            extra={"route": template, "status": status, "duration_ms": round(seconds * 1000, 2)},
        )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - start)

"""The one error shape of every service: `{"error": {type, message, location, details}}`.

Routes raise `ApiError` (an HTTPException) for what they check themselves, and let the typed
errors of the code they call propagate: a service's `ErrorTable` (exception type → status, `type`
and location) answers those, so one exception gets one answer on every route. The handlers
installed by `create_app` turn all of these, a request that fails validation, a route that does
not exist and an unexpected crash into an `ErrorBody`, so a client parses every failure of every
service the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from esper.bus.connection import CONNECTION_ERRORS
from esper.contracts.api import ErrorBody

log = logging.getLogger("esper.service")

_TYPE_OF_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def _type_of(status: int) -> str:
    return _TYPE_OF_STATUS.get(status, "error" if status < 500 else "internal")


Location = list[str | int]
LocationOf = Callable[[Request, Exception], Location | None]


@dataclass(frozen=True)
class ErrorMapping:
    """How a service answers one exception type; the message is the exception's text.

    `type`: the body's machine-readable type; None takes the exception's own `kind` attribute,
    else the status's generic type. `location`: a fixed one, or a function of the request and
    the exception (`path_param`); None takes the exception's own `location` attribute, if any.
    """

    status: int
    type: str | None = None
    location: Location | LocationOf | None = None
    headers: Mapping[str, str] | None = None


ErrorTable = Mapping[type[Exception], ErrorMapping]
"""Exception type → answer. A subclass listed too gets its own answer (the closest class wins)."""


def path_param(*names: str, otherwise: Location | None = None) -> LocationOf:
    """Point at whichever of `names` the matched route has as a path parameter (the first
    found); `otherwise` on a route with none of them. One "unknown kernel" error then points at
    `["path", "ref"]` on one route and at `["path", "kernel_id"]` on another."""

    def location(request: Request, exc: Exception) -> Location | None:
        for name in names:
            if name in request.path_params:
                return ["path", name]
        return list(otherwise) if otherwise is not None else None

    return location


def _mapped(mapping: ErrorMapping) -> Callable[[Request, Exception], Any]:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        kind = mapping.type or getattr(exc, "kind", None)
        if not isinstance(kind, str):
            kind = _type_of(mapping.status)
        where = mapping.location
        if callable(where):
            location = where(request, exc)
        elif where is not None:
            location = list(where)
        else:
            own = getattr(exc, "location", None)
            location = list(own) if isinstance(own, list | tuple) else None
        body = ErrorBody.of(kind, str(exc)[:4000], location)
        return error_response(mapping.status, body, mapping.headers)

    return handle


def install_error_table(app: FastAPI, table: ErrorTable) -> None:
    """Answer each exception type of `table` as it says, on every route of `app`."""
    for exc_type, mapping in table.items():
        app.add_exception_handler(exc_type, _mapped(mapping))


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable `type` and, for bad input, where it is."""

    def __init__(
        self,
        status_code: int,
        type: str,
        message: str,
        location: list[str | int] | None = None,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.body = ErrorBody.of(type, message[:4000], location, **details)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` documenting that these status codes return an ErrorBody."""
    return {code: {"model": ErrorBody} for code in codes}


def error_response(
    status: int, body: ErrorBody, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status, headers=dict(headers or {})
    )


def _location(loc: Sequence[Any]) -> list[str | int]:
    return [part if isinstance(part, int) else str(part) for part in loc][:32]


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.body, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, RecursionError):
        # FastAPI's own body parsing turns any parser failure into a bare 400.
        return await _too_deep(request, exc.__cause__)
    if exc.status_code == 400:
        # Only the framework raises a bare 400 (the services raise ApiError): for bytes that are
        # not text or a malformed multipart form. As bad a body as text that is not JSON, which
        # is a 422 of the one shape.
        cause = exc.__cause__
        detail = f"{cause}" if cause is not None and str(cause) else str(exc.detail)
        message = f"the request body could not be parsed: {detail}"[:4000]
        return error_response(422, ErrorBody.of("validation_error", message, ["body"]))
    kind = _type_of(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # The router stops at the first route whose path matches, so its Allow names only that
        # route's methods; a path served by several routes (GET and DELETE apart) allows them all.
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return error_response(exc.status_code, ErrorBody.of(kind, message[:4000]), headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    # Each method is tried against the whole route table rather than read off the routes, whose
    # layout (FastAPI nests included routers) is the framework's own business.
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = _location(first.get("loc", ()))
    where = ".".join(str(p) for p in location) or "request"
    message = f"{where}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    summary = [
        {"location": _location(e.get("loc", ())), "message": str(e.get("msg", ""))[:500]}
        for e in errors[:20]
    ]
    return error_response(422, ErrorBody.of("validation_error", message, location, errors=summary))


async def _too_deep(request: Request, exc: Exception) -> JSONResponse:
    # A body nested deeper than the parser's recursion limit (`[` x 100k) is bad input, not a
    # crash: answered here, below the server-error middleware, the connection stays usable.
    message = "the request body is nested too deeply to parse"
    return error_response(422, ErrorBody.of("validation_error", message, ["body"]))


REDIS_RETRY_AFTER_S = 5
"""What `Retry-After` tells a client while Redis is away: about one restart of a Redis server."""


async def _redis_away(request: Request, exc: Exception) -> JSONResponse:
    # An outage, not a bug: a client should come back, so no traceback and no 500.
    log.warning("%s %s: unreachable: %s", request.method, request.url.path, exc)
    message = (
        f"a server this service depends on (its Redis) is unreachable ({type(exc).__name__}); "
        "retry shortly"
    )
    return error_response(
        503,
        ErrorBody.of("unavailable", message),
        {"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    message = f"internal error ({type(exc).__name__}); the service log has the traceback"
    return error_response(500, ErrorBody.of("internal", message))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for outage in CONNECTION_ERRORS:  # a service's own table may still answer these its way
        if issubclass(outage, Exception):
            app.add_exception_handler(outage, _redis_away)
    app.add_exception_handler(RecursionError, _too_deep)
    app.add_exception_handler(Exception, _unexpected)

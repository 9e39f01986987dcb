"""Bearer-token auth for mutating routes: `dependencies=[RequireToken]` on a router or route."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from esper.service.errors import ApiError

# Declared through FastAPI's security scheme so that the OpenAPI document marks the guarded
# operations (app.py documents their 401 and 403 from that mark); the header is checked below.
_bearer = HTTPBearer(auto_error=False, description="the service's API token (<SERVICE>_API_TOKEN)")


def require_token(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> None:
    """Pass when no token is configured (a local stack) or the request carries the right one."""
    expected = request.app.state.settings.api_token
    if expected is None or not expected.get_secret_value():
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="esper"'}
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401,
            "unauthorized",
            "this route needs an Authorization: Bearer <token> header",
            ["header", "authorization"],
            headers=challenge,
        )
    # compare_digest: the time taken must not reveal how much of the token matched.
    if not hmac.compare_digest(given.strip().encode(), expected.get_secret_value().encode()):
        raise ApiError(
            403,
            "forbidden",
            "the bearer token is not valid for this service",
            ["header", "authorization"],
        )


RequireToken = Depends(require_token)

"""The HTTP plumbing every client of the services shares: how an httpx client is built (base URL,
bearer token, timeout, and a transport a test may inject), and how an error answer, or no answer
at all, becomes an `esper.exceptions.ServiceError`."""

from __future__ import annotations

import math

import httpx

from esper.exceptions import ServiceError, ServiceUnreachableError

#: How much of a body that is not an error body an error message quotes.
QUOTED_CHARS = 500


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for `token`; none for None or "" (compose's `${TOKEN:-}`)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def async_http(
    *,
    base_url: str = "",
    token: str | None = None,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=bearer(token), timeout=timeout_s, transport=transport
    )


def sync_http(
    *,
    base_url: str = "",
    token: str | None = None,
    timeout_s: float,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    return httpx.Client(
        base_url=base_url.rstrip("/"), headers=bearer(token), timeout=timeout_s, transport=transport
    )


def error_from(service: str, response: httpx.Response) -> ServiceError:
    """The error a non-2xx answer means. Every service answers `{"error": {type, message, ...}}`
    (esper.service.errors); a body of another shape (a proxy's page, plain text) keeps its status
    and is quoted as the message."""
    kind, message = "error", ""
    try:
        body = response.json()
    except ValueError:  # not JSON, or not UTF-8
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        if isinstance(error.get("type"), str) and error["type"]:
            kind = error["type"]
        if isinstance(error.get("message"), str):
            message = error["message"]
    if not message:
        message = response.text.strip()[:QUOTED_CHARS] or response.reason_phrase
    return ServiceError(
        service, response.status_code, kind, message, retry_after_s=retry_after_s(response)
    )


def raise_for_error(service: str, response: httpx.Response) -> None:
    if not response.is_success:
        raise error_from(service, response)


def unreachable(service: str, request: str, err: httpx.HTTPError) -> ServiceUnreachableError:
    """`request` is what was asked (`GET http://…/kernels/x`); the error class names the failure
    (ConnectError, ReadTimeout, …), which its text alone often does not."""
    return ServiceUnreachableError(service, f"{request}: {type(err).__name__}: {err}")


def retry_after_s(response: httpx.Response) -> float | None:
    """A numeric Retry-After in seconds; None when absent, negative or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None

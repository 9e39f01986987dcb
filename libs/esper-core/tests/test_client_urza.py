"""The plumbing UrzaClient shares with the other clients, where a real Urza cannot show it: no
answer at all (a port nothing listens on), and answers Urza never sends (a proxy's plain-text
error page, a Retry-After, a body that is not what was asked) through an injected transport.
UrzaClient against a real Urza is services/urza/tests/test_urza_client.py.

Also the settings every service that calls Urza shares (`UrzaLinkSettings`), and the one backoff
of the bus and the HTTP kernel tier."""

from __future__ import annotations

import statistics

import httpx
import pytest
from pydantic_settings import SettingsConfigDict

from esper._backoff import Backoff
from esper.bus import Backoff as BusBackoff
from esper.client import Esper, ServiceUrls, UrzaClient
from esper.exceptions import ConfigError, ServiceError, ServiceUnreachableError
from esper.service import ServiceSettings, UrzaLinkSettings
from esper.testing import free_port


def answering(*replies: httpx.Response) -> httpx.MockTransport:
    """A transport answering each request with the next reply (the last one repeats)."""
    queue = list(replies)
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    transport = httpx.MockTransport(handle)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


async def test_no_answer_is_service_unreachable_naming_the_request() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with UrzaClient(url, timeout_s=2.0) as client:
        with pytest.raises(ServiceUnreachableError, match="ConnectError") as caught:
            await client.blueprints()
    assert (caught.value.status, caught.value.type) == (503, "unreachable")
    assert caught.value.message.startswith(f"GET {url}/blueprints: ConnectError")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_the_bearer_token_and_the_quoted_ref_are_sent() -> None:
    transport = answering(httpx.Response(404, json={"error": {"type": "unknown_kernel"}}))
    async with UrzaClient("http://urza/", token="s3cret", transport=transport) as client:
        with pytest.raises(ServiceError):
            await client.kernel("a tag/../x")
    [request] = transport.seen  # type: ignore[attr-defined]
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.url.raw_path == b"/kernels/a%20tag%2F..%2Fx"


@pytest.mark.parametrize(
    ("reply", "status", "kind", "message", "retry_after_s"),
    [
        (
            httpx.Response(
                429,
                json={"error": {"type": "too_many_requests", "message": "queue full"}},
                headers={"Retry-After": "1.5"},
            ),
            429,
            "too_many_requests",
            "queue full",
            1.5,
        ),
        (
            httpx.Response(502, text="  <html>bad gateway</html>\n"),
            502,
            "error",
            "<html>bad gateway</html>",
            None,
        ),
        (
            httpx.Response(503, headers={"Retry-After": "Fri, 07 Nov 2025 10:00:00 GMT"}),
            503,
            "error",
            "Service Unavailable",
            None,
        ),
        (
            httpx.Response(
                500, content=b'["not an error body"]', headers={"Content-Type": "application/json"}
            ),
            500,
            "error",
            '["not an error body"]',
            None,
        ),
    ],
)
async def test_error_answers_of_every_shape_are_service_errors(
    reply: httpx.Response, status: int, kind: str, message: str, retry_after_s: float | None
) -> None:
    async with UrzaClient("http://urza", transport=answering(reply)) as client:
        with pytest.raises(ServiceError) as caught:
            await client.blueprints()
    assert type(caught.value) is ServiceError
    error = caught.value
    assert (error.service, error.status, error.type) == ("urza", status, kind)
    assert error.message == message
    assert error.retry_after_s == retry_after_s


async def test_a_success_that_is_not_what_was_asked_is_an_invalid_response() -> None:
    transport = answering(httpx.Response(200, json={"kernel_id": "not a kernel meta"}))
    async with UrzaClient("http://urza", transport=transport) as client:
        with pytest.raises(ServiceError, match="unreadable answer: ValidationError") as caught:
            await client.kernel("eff_v1")
    assert (caught.value.status, caught.value.type) == (200, "invalid_response")


def test_the_sync_client_parses_errors_the_same_way() -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(404, json={"error": {"type": "not_found", "message": "x"}})
    )
    urls = ServiceUrls.from_env(urza="http://urza")
    with Esper(urls, transport=transport) as esper, pytest.raises(ServiceError) as caught:
        esper.blueprints()
    assert (caught.value.status, caught.value.type, caught.value.message) == (404, "not_found", "x")


# ------------------------------------------------------------------------ UrzaLinkSettings
class LinkedSettings(ServiceSettings, UrzaLinkSettings):
    model_config = SettingsConfigDict(env_prefix="LINKED_", extra="ignore", frozen=True)


def test_the_urza_link_reads_prefix_urza_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESPER_URZA_URL", raising=False)
    default = LinkedSettings()
    assert (default.urza_url, default.urza_token_value, default.urza_timeout_s) == (
        "http://127.0.0.1:8004",
        None,
        10.0,
    )

    monkeypatch.setenv("ESPER_URZA_URL", "http://stack-urza:9000/")
    assert LinkedSettings().urza_url == "http://stack-urza:9000"

    monkeypatch.setenv("LINKED_URZA_URL", "http://urza:8004/")
    monkeypatch.setenv("LINKED_URZA_TOKEN", "s3cret")
    monkeypatch.setenv("LINKED_URZA_TIMEOUT_S", "3.5")
    settings = LinkedSettings()
    assert (settings.urza_url, settings.urza_token_value, settings.urza_timeout_s) == (
        "http://urza:8004",
        "s3cret",
        3.5,
    )
    client = settings.urza_client()
    assert client is not None and client.base_url == "http://urza:8004"

    # Compose passes an unset variable as "": no Urza, whatever ESPER_URZA_URL says.
    monkeypatch.setenv("LINKED_URZA_URL", "")
    assert LinkedSettings().urza_url is None and LinkedSettings().urza_client() is None
    monkeypatch.setenv("LINKED_URZA_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="urza_timeout_s"):
        LinkedSettings()


# --------------------------------------------------------------------------------- backoff
def test_backoff_grows_exponentially_to_its_cap_within_its_floor() -> None:
    full = Backoff(0.1, 1.0)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]):
        delays = [full.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.25)
    assert full.delay(10_000) <= 1.0  # no overflow however long the outage

    bus = BusBackoff(0.05, 2.0)  # the bus never reconnects sooner than its low bound
    delays = [bus.next_delay() for _ in range(12)]
    assert bus.attempts == 12
    assert all(0.05 <= d <= 2.0 for d in delays) and delays[0] == 0.05
    bus.reset()
    assert bus.attempts == 0 and bus.next_delay() == 0.05

    with pytest.raises(ConfigError):
        Backoff(1.0, 0.5)
    with pytest.raises(ConfigError):
        Backoff(0.1, 1.0, floor_s=0.2)

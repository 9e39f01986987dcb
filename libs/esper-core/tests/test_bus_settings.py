"""BusSettings: environment, names, and the combinations it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from esper.bus import BusSettings
from esper.exceptions import ConfigError


def test_defaults_name_streams_with_one_prefix() -> None:
    s = BusSettings()
    assert [s.stream(t) for t in s.topics] == [
        "esper:telemetry",
        "esper:control",
        "esper:health",
        "esper:events",
        "esper:jobs",
    ]
    assert s.dead_letter_stream == "esper:dead-letter"
    assert s.done_key("g", "abc") == "esper:done:g:abc"
    assert s.block_ms < s.socket_timeout_s * 1000


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_BUS_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("ESPER_BUS_PREFIX", "staging")
    monkeypatch.setenv("ESPER_BUS_TOPICS", '["telemetry", "control", "alerts"]')
    monkeypatch.setenv("ESPER_BUS_MAXLEN_OVERRIDES", '{"telemetry": 5000}')
    monkeypatch.setenv("ESPER_BUS_MAX_DELIVERIES", "7")
    s = BusSettings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.stream("alerts") == "staging:alerts"
    assert s.maxlen_for("telemetry") == 5000 and s.maxlen_for("control") == s.maxlen
    assert s.max_deliveries == 7


def test_unknown_topic_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown topic 'telemtry'"):
        BusSettings().stream("telemtry")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_ms": 5000, "socket_timeout_s": 5.0}, "block_ms"),
        ({"block_ms": 4950, "socket_timeout_s": 5.0}, "block_ms"),
        ({"block_ms": 6000, "socket_timeout_s": 5.0}, "block_ms"),
        ({"reconnect_backoff_min_s": 3.0, "reconnect_backoff_max_s": 1.0}, "backoff"),
        ({"prefix": "has space"}, "letters, digits"),
        ({"topics": ("control", "control")}, "distinct"),
        ({"topics": ("control", "dead-letter")}, "distinct"),
        ({"lossy_topics": ("nope",)}, "unknown topic"),
        ({"maxlen_overrides": {"control": 0}}, ">= 1"),
        ({"max_deliveries": 0}, "greater than or equal"),
        ({"claim_idle_ms": 10}, "greater than or equal"),
    ],
)
def test_bad_combinations_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BusSettings(**overrides)  # type: ignore[arg-type]


def test_block_just_under_the_socket_timeout_is_accepted() -> None:
    s = BusSettings(block_ms=4900, socket_timeout_s=5.0)
    assert s.block_ms == 4900

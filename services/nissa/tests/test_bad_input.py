"""Bad input never crashes Nissa and never grows a label without bound: garbage on the streams is
dead-lettered (by the bus, in Nissa's group) and counted by reason, and valid messages carrying
floods of made-up names are capped."""

from __future__ import annotations

import json
import time

import httpx
from nissahelpers import Bus, Scrape, poll, scrape

from esper.contracts import Envelope, Heartbeat, SeedStats, TelemetryReport
from esper.testing import ServiceProcess


def dead_lettered(metrics: Scrape, **labels: str) -> float:
    return sum(s.value for s in metrics.of("esper_bus_dead_lettered_total", **labels))


def test_garbage_on_every_topic_is_dead_lettered_counted_and_survived(
    nissa: ServiceProcess, bus: Bus
) -> None:
    before = scrape(nissa.url)
    report = TelemetryReport(job_id="job-ok", epoch=0, step=1, kind="epoch", val_accuracy=0.5)
    good = Envelope.wrap(report, source="test").model_dump(mode="json")

    def variant(**changes: object) -> bytes:
        return json.dumps({**good, **changes}).encode()

    garbage = {
        "malformed": [
            ("telemetry", b"not json at all"),
            ("events", b"\xff\xfe\x00binary"),
            ("control", b"[1, 2, 3]"),
            ("health", json.dumps({"id": "x"}).encode()),  # no type, version, payload
            ("jobs", b'{"type": "job.queued", "version": 1, "source": "t", "payload": {}, "x": 1}'),
        ],
        "unknown_type": [("telemetry", variant(type="telemetry.horoscope"))],
        "unsupported_version": [("telemetry", variant(version=99))],
        "invalid_payload": [
            ("telemetry", variant(payload={**good["payload"], "epoch": -1})),
            ("telemetry", variant(payload={**good["payload"], "val_accuracy": 7.5})),
            (  # v1: the version of `good` is telemetry's (3), which seed transitions lack
                "events",
                variant(type="event.seed_transition", version=1, payload={"job_id": "../etc"}),
            ),
        ],
    }
    for items in garbage.values():
        for topic, raw in items:
            bus.raw(topic, raw)
    bus.raw("telemetry", b"{}", field="not-the-envelope-field")  # no envelope field at all
    bus.publish(report)  # a valid message after all that is still handled

    expected = {reason: len(items) for reason, items in garbage.items()}
    expected["malformed"] += 1

    def counted() -> Scrape | None:
        m = scrape(nissa.url)
        grown = {
            reason: dead_lettered(m, reason=reason, group="nissa")
            - dead_lettered(before, reason=reason, group="nissa")
            for reason in expected
        }
        handled = m.value("esper_job_val_accuracy_ratio", job_id="job-ok") == 0.5
        return m if grown == expected and handled else None

    metrics = poll(counted, f"dead-lettered counts {expected}, and the valid report handled")
    assert (
        dead_lettered(metrics, topic="telemetry", group="nissa")
        - dead_lettered(before, topic="telemetry", group="nissa")
        == 6
    )
    assert sum(s.value for s in metrics.of("esper_nissa_handler_errors_total")) == 0
    assert (metrics.value("esper_bus_dead_letter_length_messages") or 0) >= 10
    assert httpx.get(f"{nissa.url}/readyz").json()["status"] == "ready"
    assert nissa.running


def test_floods_of_names_stay_within_their_bounds(nissa: ServiceProcess, bus: Bus) -> None:
    """200 made-up services (max_services: 64), 40 cache tiers (16), 5,000 seeds in one job
    (max_seeds_per_job: 64): the series stay bounded and Nissa stays up."""
    now = time.time()
    beats = [
        (
            Heartbeat(
                service=f"svc-{i}", instance="i", status="ok", started_at=now, interval_s=60.0
            ),
            now,
        )
        for i in range(200)
    ]
    tiers = {f"cache.tier{i}.hits": 1 for i in range(40)}
    beats.append(
        (
            Heartbeat(
                service="tolaria-job",
                instance="job-tiers",
                status="ok",
                started_at=now,
                interval_s=5.0,
                details={"job_id": "job-tiers", **tiers},
            ),
            now,
        )
    )
    seeds = [
        SeedStats(layer=f"layer{i // 4}", seed=i % 4, state="ACTIVE", alpha=0.5)
        for i in range(4096)
    ]
    beats.append(
        (TelemetryReport(job_id="job-seeds", epoch=0, step=1, kind="step", seeds=seeds), now)
    )
    bus.publish_all(beats)

    def settled() -> Scrape | None:
        m = scrape(nissa.url)
        refused = m.value("esper_nissa_refused_total", what="service") or 0
        tiers = m.of("esper_kernel_cache_hits_total", tier="other")
        seeds = m.of("esper_seed_alpha", job_id="job-seeds")
        return m if refused >= 200 - 63 and tiers and seeds else None

    metrics = poll(settled, "the floods handled")
    services = {s.labels["service"] for s in metrics.of("esper_service_up")}
    assert len(services) <= 64 and "nissa" in services
    tiers_seen = {s.labels["tier"] for s in metrics.of("esper_kernel_cache_hits_total")}
    assert len(tiers_seen) <= 17 and "other" in tiers_seen
    assert len(metrics.of("esper_seed_alpha", job_id="job-seeds")) == 64
    assert metrics.value("esper_job_seeds", job_id="job-seeds", state="ACTIVE") == 64
    report = httpx.get(f"{nissa.url}/reports/jobs/job-seeds").json()
    assert len(report["seeds"]) == 64 and report["dropped"]["seeds"] == 4096 - 64
    assert httpx.get(f"{nissa.url}/healthz").status_code == 200

"""Nissa in the local stack (real Redis, Urza, Tolaria and Nissa processes) after a real job with
a real germinate decision (stopped after a few epochs):

- the job's series are in `/metrics`, and its report has its curve, decision and seed;
- every metric name the Grafana dashboard and the alert rules use is in a real scrape (Nissa's,
  or the service's own `/metrics` for `esper_urza_*` and `esper_http_*`), with every label the
  queries name;
- the HTML report, rendered by headless Chromium, shows both curves and the seed timeline;
- a stopped service goes down in `esper_service_up` after its missed beats (last: it stops Urza).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from nissahelpers import Scrape, poll, scrape

from esper.contracts import ControlDecision, Envelope
from esper.stack import LocalStack

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "esper.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself for each target, never in any /metrics."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""

FAST_STACK = {
    "URZA_HEARTBEAT_INTERVAL_S": "0.5",
    "TOLARIA_HEARTBEAT_INTERVAL_S": "0.5",
    "NISSA_HEARTBEAT_INTERVAL_S": "0.5",
    "NISSA_BUS_POLL_INTERVAL_S": "0.3",
    "NISSA_SNAPSHOT_INTERVAL_S": "0.5",
    "URZA_LOG_JSON": "false",
    "TOLARIA_LOG_JSON": "false",
    "NISSA_LOG_JSON": "false",
}
JOB = {
    "name": "nissa-real-job",
    "model": {"kind": "mlp", "hidden": [8, 8], "activation": "tanh"},
    "dataset": {"kind": "spirals", "samples": 600, "noise": 0.1, "seed": 1},
    "training": {"epochs": 5000, "batch_size": 32, "lr": 0.01, "telemetry_every_steps": 5},
    "morphogenesis": {"ramp_steps": 10},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    with LocalStack(root, services=["urza", "tolaria", "nissa"], env=FAST_STACK) as running:
        yield running


@pytest.fixture(scope="module")
def job(stack: LocalStack) -> str:
    """A real job through Tolaria, with a germinate decision on the control topic (as Tamiyo
    would publish it). It is stopped once Nissa has seen its seed ACTIVE and a heartbeat of its
    process with kernel cache counters: job processes beat every 5 s, and this small job would
    otherwise end before its first beat with counters."""
    tolaria = httpx.Client(base_url=stack.url("tolaria"), timeout=60)
    response = tolaria.post("/jobs", json=JOB)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    decision = ControlDecision(
        decision_id=f"dec-{uuid.uuid4().hex[:8]}",
        job_id=job_id,
        action="germinate",
        layer="2",
        blueprint="wide_mlp",
        alpha=1.0,
        ramp_steps=10,
        reason="nissa test",
    )
    bus = redis.Redis.from_url(stack.redis_url)
    bus.xadd("esper:control", {"envelope": Envelope.wrap(decision, source="test").encode()})
    bus.close()
    nissa = stack.url("nissa")

    def seen() -> bool:
        metrics = scrape(nissa)
        view = tolaria.get(f"/jobs/{job_id}").json()
        assert view["status"] in ("PENDING", "RUNNING"), view
        return (
            metrics.value("esper_job_seeds", job_id=job_id, state="ACTIVE") == 1
            and (metrics.value("esper_job_epoch", job_id=job_id) or 0) >= 3
            and (metrics.value("esper_kernel_cache_misses_total", tier="memory") or 0) >= 1
        )

    poll(seen, "the job's seed and its process's cache counters in Nissa", deadline_s=120)
    assert tolaria.post(f"/jobs/{job_id}/stop").status_code == 200
    poll(
        lambda: scrape(nissa).value("esper_job_status", job_id=job_id, status="STOPPED") == 1,
        "Nissa to see the job stop",
        deadline_s=60,
    )
    tolaria.close()
    return job_id


def test_a_real_job_shows_in_the_metrics_and_its_report(stack: LocalStack, job: str) -> None:
    metrics = scrape(stack.url("nissa"))
    epochs = metrics.value("esper_job_epoch", job_id=job)
    assert epochs >= 3
    # 420 training samples, 32 a batch: 14 steps an epoch (and the stopped epoch's steps)
    assert epochs * 14 <= metrics.value("esper_job_step", job_id=job) < (epochs + 1) * 14
    assert 0 < metrics.value("esper_job_val_accuracy_ratio", job_id=job) <= 1
    assert metrics.value("esper_job_train_loss", job_id=job) > 0
    assert metrics.value("esper_job_samples_per_second", job_id=job) > 0
    assert metrics.value("esper_job_seeds", job_id=job, state="ACTIVE") == 1
    assert metrics.value("esper_seed_alpha", job_id=job, layer="2", seed="0") == 1.0
    assert metrics.value("esper_seed_contribution", job_id=job, layer="2", seed="0") is not None
    assert metrics.value("esper_job_seed_parameters", job_id=job) > 0  # from Urza's kernel
    assert metrics.value("esper_decision_outcomes_total", action="germinate", outcome="applied")
    assert metrics.value("esper_decision_latency_seconds_count", action="germinate") == 1
    assert metrics.value("esper_seed_transitions_total", from_state="LOADING", to_state="ACTIVE")
    assert metrics.value("esper_training_step_duration_seconds_count") > 0
    assert metrics.value("esper_jobs_finished_total", status="STOPPED") == 1
    for service in ("urza", "tolaria", "nissa"):
        assert metrics.value("esper_service_up", service=service) == 1, service
    assert metrics.value("esper_kernel_cache_misses_total", tier="memory") >= 1

    report = httpx.get(f"{stack.url('nissa')}/reports/jobs/{job}").json()
    assert report["status"] == "STOPPED"
    assert [e["epoch"] for e in report["epochs"]] == list(range(int(epochs)))
    assert all(e["val_accuracy"] is not None for e in report["epochs"])
    (decision,) = report["decisions"]
    assert decision["outcome"] == "applied" and decision["latency_s"] >= 0
    (seed,) = report["seeds"]
    assert seed["state"] == "ACTIVE" and seed["blueprint"] == "wide_mlp" and seed["params"] > 0
    assert [t["to_state"] for t in seed["transitions"]][:3] == ["ALLOCATED", "LOADING", "ACTIVE"]
    assert seed["contribution"] is not None


# ------------------------------------------------------------------ dashboard and alerts
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN"}
_KEYWORDS |= {"by", "without", "on", "ignoring", "group_left", "group_right"}


def parse_promql(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, label names matched per metric, labels grouped by) in a PromQL
    expression: enough PromQL to read every query of our dashboard and rules. A name followed by
    `(` is a function or an aggregation; strings, ranges and Grafana variables are skipped."""
    text = _STRING.sub('""', expr)
    matched: dict[str, set[str]] = {}
    for name, body in _MATCHERS.findall(text):
        labels = {
            m.group(0) for m in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*(?=\s*(=~|!~|!=|=))", body)
        }
        matched.setdefault(name, set()).update(labels)
    grouped = {
        label.strip() for _, body in _LABEL_LISTS.findall(text) for label in body.split(",")
    } - {""}
    text = _MATCHERS.sub(lambda m: m.group(1) or "", text)
    text = _LABEL_LISTS.sub("", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[: match.start()]
        if before and (before[-1].isdigit() or before[-1] in ".$"):
            continue  # 1e3, 0.5, $variable
        if text[match.end() :].lstrip().startswith("(") or match.group(0) in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names, matched, grouped


def test_parse_promql_reads_names_labels_and_groupings() -> None:
    names, matched, grouped = parse_promql(
        'histogram_quantile(0.95, sum by (service, le) (rate(esper_x_bucket{job_id=~"$job_id", '
        'a!="b"}[$__rate_interval]))) / on (service) group_left esper_y_total > 1e3 and up == 0'
    )
    assert names == {"esper_x_bucket", "esper_y_total", "up"}
    assert matched == {"esper_x_bucket": {"job_id", "a"}}
    assert grouped == {"service", "le"}


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query or "")
        if variable["type"] == "query":
            assert found, f"unexpected variable query {query!r}"
            queries.append(f"max by ({found.group(2)}) ({found.group(1)})")
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported(
    stack: LocalStack, job: str
) -> None:
    # A malformed message, so that the dead-letter counter has a sample like the others.
    bus = redis.Redis.from_url(stack.redis_url)
    bus.xadd("esper:events", {"envelope": b"garbage"})
    bus.close()
    nissa = stack.url("nissa")
    poll(lambda: scrape(nissa).of("esper_bus_dead_lettered_total"), "the dead letter counted")
    scrapes: list[Scrape] = [scrape(stack.url(s)) for s in ("nissa", "urza", "tolaria")]
    labels: dict[str, set[str]] = {}
    for metrics in scrapes:
        for sample in metrics.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)

    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 30
    used: set[str] = set()
    for expr in queries:
        names, matched, grouped = parse_promql(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
        for name in names - PROMETHEUS_OWN:
            assert name in labels, f"{name} (in {expr!r}) is in no scrape"
        for name, wanted in matched.items():
            if name in PROMETHEUS_OWN:
                continue
            missing = wanted - labels[name] - TARGET_LABELS
            assert not missing, f"{name} has no label {missing} (in {expr!r})"
        known = set().union(*(labels.get(n, set()) for n in names)) | TARGET_LABELS | {"le"}
        assert grouped <= known, f"{expr!r} groups by {grouped - known}, which none of {names} has"
    # The panels the issue asks for are all there.
    for name in (
        "esper_jobs",
        "esper_job_train_loss",
        "esper_job_val_accuracy_ratio",
        "esper_job_seeds",
        "esper_decisions_total",
        "esper_kernel_cache_hits_total",
        "esper_bus_consumer_lag_messages",
        "esper_bus_consumer_pending_messages",
        "esper_service_up",
        "esper_urza_compile_duration_seconds_bucket",
        "esper_bus_dead_lettered_total",
    ):
        assert name in used, name


def test_the_scrape_follows_prometheus_conventions(stack: LocalStack, job: str) -> None:
    """`promtool check metrics` lints a real scrape: counters end in `_total`, units are base
    units named in the suffix, the exposition is well formed."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed: run deploy/install-test-tools.sh")
    text = httpx.get(f"{stack.url('nissa')}/metrics").text
    assert f'esper_job_epoch{{job_id="{job}"}}' in text
    result = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the HTML
def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prior = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, prior, channels)
        rows.append(bytes(line) if channels == 3 else bytes(_rgb(line)))
        prior = line
    return width, height, rows


def _unfilter(kind: int, line: bytearray, prior: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    if kind == 2:
        line[:] = bytes((a + b) & 0xFF for a, b in zip(line, prior, strict=True))
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = prior[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = prior[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = (line[i] + pred) & 0xFF
        else:
            raise AssertionError(f"PNG filter type {kind}")


def _rgb(line: bytearray) -> bytearray:
    out = bytearray()
    for i in range(0, len(line), 4):
        out += line[i : i + 3]
    return out


def color_counts(rows: list[bytes]) -> dict[tuple[int, int, int], int]:
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for i in range(0, len(row), 3):
            key = (row[i], row[i + 1], row[i + 2])
            counts[key] = counts.get(key, 0) + 1
    return counts


def _hex(color: str) -> tuple[int, int, int]:
    return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))


def test_the_html_report_renders_both_curves_and_the_seed_timeline(
    stack: LocalStack, job: str, tmp_path: Path
) -> None:
    from nissa.report_html import SERIES_COLORS, STATE_COLORS

    url = f"{stack.url('nissa')}/reports/jobs/{job}.html"
    page = httpx.get(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for element in ('id="loss-chart"', 'id="accuracy-chart"', 'id="seed-timeline"'):
        assert element in html, element
    three_points = r'points="[\d.]+,[\d.]+( [\d.]+,[\d.]+){2,}"'
    for curve in ("train-loss", "val-loss", "val-accuracy"):  # a point per epoch (3 or more)
        assert re.search(f'<polyline class="curve {curve}" {three_points}', html), curve
    assert 'class="segment state-ACTIVE"' in html and 'class="marker marker-germinate"' in html
    for fetch in ("<script", "<link", "src=", "href=", "url("):  # nothing to fetch, no JS
        assert fetch not in html, fetch

    chromium = browser()
    if chromium is None:
        pytest.skip(
            "no chromium on PATH: run deploy/install-test-tools.sh (apt-get install chromium)"
        )
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            url,
        ],
        capture_output=True,
        timeout=90,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, rows = read_png(shot)
    assert (width, height) == (1200, 900)
    counts = color_counts(rows)
    white = counts.get((255, 255, 255), 0)
    assert white < 0.95 * width * height, "the page is (almost) blank"
    assert len(counts) > 50, "too few colours for charts"
    # Each chart is on screen: the curves' and the timeline's own colours, over a real length.
    for what, color, pixels in [
        ("train loss curve", SERIES_COLORS["train"], 300),
        ("validation loss curve", SERIES_COLORS["val"], 300),
        ("accuracy curve", SERIES_COLORS["acc"], 300),
        ("ACTIVE segment of the seed timeline", STATE_COLORS["ACTIVE"], 5000),
    ]:
        assert counts.get(_hex(color), 0) >= pixels, f"{what}: {counts.get(_hex(color), 0)} px"


# ------------------------------------------------------------------ last: stop a service
def test_a_stopped_service_goes_down_after_its_missed_beats(stack: LocalStack, job: str) -> None:
    nissa = stack.url("nissa")
    assert scrape(nissa).value("esper_service_up", service="urza") == 1
    stack.services["urza"].stop()
    stopped = time.monotonic()
    poll(
        lambda: scrape(nissa).value("esper_service_up", service="urza") == 0,
        "urza down after 3 missed beats of 0.5 s",
    )
    assert time.monotonic() - stopped < 10
    health = httpx.get(f"{nissa}/health/services").json()
    urza = next(s for s in health["services"] if s["service"] == "urza")
    assert urza["up"] is False and urza["instances_up"] == 0
    assert scrape(nissa).value("esper_service_up", service="tolaria") == 1

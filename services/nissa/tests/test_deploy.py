"""The Prometheus and Grafana files under deploy/: promtool accepts the config and the rules, the
rules' own unit tests pass (alerts fire on what they should, and only then), and the Grafana
provisioning and dashboard are well formed. Which metric names they use is checked against a
real scrape in test_real_stack.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool is not installed: run deploy/install-test-tools.sh "
            "(apt-get install prometheus; needs root and Debian's apt)"
        )
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_prometheus_files(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_nissa_and_every_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "nissa": ["nissa:8003"],
        "tolaria": ["tolaria:8001"],
        "tamiyo": ["tamiyo:8002"],
        "urza": ["urza:8004"],
    }
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            # A target label named like one of Esper's own labels would rename it on scrape.
            assert not {"service", "job_id"} & set(static.get("labels", {}))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"EsperServiceDown", "EsperDeadLetterGrowth", "EsperJobFailed"} <= names


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/esper.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_the_dashboard_is_well_formed() -> None:
    board = json.loads((GRAFANA / "dashboards/esper.json").read_text())
    assert board["uid"] and board["title"] == "Esper"
    all_panels = panels(board)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in all_panels}
    for wanted in (
        "Jobs by status",
        "Loss",
        "Validation accuracy",
        "Seeds by state",
        "Decisions by action",
        "Kernel cache hit rate by tier",
        "Consumer lag by group",
        "Pending by group",
        "Service up",
    ):
        assert wanted in titles, wanted
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}
            assert target["expr"].strip(), panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"job_id", "nissa_url"} <= variables

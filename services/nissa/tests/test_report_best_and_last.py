"""Issue 15, item 4: a job's report shows its final metrics, last epoch against best validation
epoch, as the job's ending `event.job_status` (v2) said them — through a real Redis into a real
Nissa. A v1 status (no metrics) is still read, and a report file Nissa wrote before reports had
`final` still loads."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nissahelpers import Bus, job_story, poll, scrape

from esper.contracts import JobMetrics, JobStatusChanged, JobStatusChangedV1
from esper.testing import ServiceProcess
from nissa.reports import JobReport

FINAL = JobMetrics(
    train_loss=0.21,
    val_loss=0.31,
    val_accuracy=0.8,
    test_loss=0.33,
    test_accuracy=0.775,
    samples_per_s=512.0,
    best_epoch=1,
    best_val_accuracy=0.85,
    best_test_accuracy=0.8125,
    parameters=13_824,
    train_flops=4.2e12,
)
OLD_JOB = "job-written-before-final"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nissa-final")


def previous_version_report(job_id: str) -> str:
    """A finished job's report as the Nissa before `final` wrote it: no such key."""
    report = JobReport(
        job_id=job_id,
        status="SUCCEEDED",
        attempt=1,
        first_seen=time.time() - 60,
        last_seen=time.time() - 30,
        finished_at=time.time() - 30,
        epochs_completed=3,
        step=42,
        val_accuracy=0.8,
    )
    fields: dict[str, Any] = report.model_dump(mode="json")
    del fields["final"]
    return json.dumps(fields)


@pytest.fixture(scope="module")
def nissa(nissa_factory: Callable[..., ServiceProcess], data_dir: Path) -> ServiceProcess:
    reports = data_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"{OLD_JOB}.json").write_text(previous_version_report(OLD_JOB))
    return nissa_factory(NISSA_DATA_DIR=str(data_dir))


def ended_with(job_id: str, t0: float, status: JobStatusChanged | JobStatusChangedV1) -> list[Any]:
    """The story of `job_story`, ending with `status` instead of its own v1-shaped SUCCEEDED."""
    story = job_story(job_id, t0)
    assert isinstance(story[-1][0], JobStatusChanged)
    return [*story[:-1], (status, story[-1][1])]


def final_of(url: str, job_id: str) -> dict[str, Any] | None:
    response = httpx.get(f"{url}/reports/jobs/{job_id}")
    if response.status_code != 200:
        return None
    report = response.json()
    return report if report["status"] != "RUNNING" and report["final"] is not None else None


def final_table(html: str) -> dict[str, list[str]]:
    """The final-metrics table of the HTML report: row heading → its cells (the head row under
    "")."""
    found = re.search(r'<table id="final"[^>]*>(.*?)</table>', html, re.S)
    assert found, "the report has no final-metrics table"
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", found.group(1), re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        rows[cells[0]] = cells[1:]
    return rows


def test_a_v2_status_with_metrics_ends_up_in_the_report_json_on_disk_and_html(
    nissa: ServiceProcess, bus: Bus, data_dir: Path
) -> None:
    job = "job-best-and-last"
    end = JobStatusChanged(job_id=job, status="SUCCEEDED", previous="RUNNING", metrics=FINAL)
    bus.publish_all(ended_with(job, time.time() - 10, end))

    report = poll(lambda: final_of(nissa.url, job), "the report's final metrics")
    assert report["status"] == "SUCCEEDED"
    assert report["final"] == FINAL.model_dump(mode="json")
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]

    stored = data_dir / "reports" / f"{job}.json"

    def written() -> dict[str, Any] | None:
        if not stored.exists():
            return None
        on_disk = json.loads(stored.read_text())
        return on_disk if on_disk.get("final") else None

    assert poll(written, "the final metrics in the stored report")["final"] == report["final"]

    page = httpx.get(f"{nissa.url}/reports/jobs/{job}.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    table = final_table(page.text)
    assert table[""] == ["last epoch (3)", "best epoch (2)"]
    assert table["validation accuracy"] == ["0.8", "0.85"]
    assert table["test accuracy"] == ["0.775", "0.8125"]
    assert table["parameters"] == ["13,824"]
    assert table["training FLOPs"] == ["4.2e+12"]


def test_a_v1_status_is_still_accepted_and_its_report_has_no_final_metrics(
    nissa: ServiceProcess, bus: Bus
) -> None:
    job = "job-v1-ending"
    end = JobStatusChangedV1(job_id=job, status="SUCCEEDED", previous="RUNNING")
    bus.publish_all(ended_with(job, time.time() - 10, end))

    poll(
        lambda: scrape(nissa.url).value("esper_job_status", job_id=job, status="SUCCEEDED") == 1,
        "the v1 ending folded",
    )
    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert report["status"] == "SUCCEEDED" and report["final"] is None
    dead = scrape(nissa.url).of("esper_bus_dead_lettered_total", topic="events", group="nissa")
    assert sum(s.value for s in dead) == 0
    page = httpx.get(f"{nissa.url}/reports/jobs/{job}.html")
    assert page.status_code == 200 and 'id="final"' not in page.text


def test_a_report_written_before_final_metrics_still_loads(nissa: ServiceProcess) -> None:
    report = httpx.get(f"{nissa.url}/reports/jobs/{OLD_JOB}")
    assert report.status_code == 200, report.text
    assert report.json()["status"] == "SUCCEEDED" and report.json()["final"] is None
    assert httpx.get(f"{nissa.url}/reports/jobs/{OLD_JOB}.html").status_code == 200


def test_an_ended_job_that_measured_nothing_says_no_metrics(
    nissa: ServiceProcess, bus: Bus
) -> None:
    job = "job-failed-at-once"
    bus.publish_all(
        [
            (JobStatusChanged(job_id=job, status="RUNNING", previous="PENDING"), time.time() - 2),
            (
                JobStatusChanged(
                    job_id=job, status="FAILED", previous="RUNNING", error="no such file"
                ),
                time.time() - 1,
            ),
        ]
    )
    poll(
        lambda: scrape(nissa.url).value("esper_job_status", job_id=job, status="FAILED") == 1,
        "the failure folded",
    )
    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert report["final"] is None and report["error"] == "no such file"

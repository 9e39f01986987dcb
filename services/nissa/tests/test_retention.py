"""Nissa's bounds over time: a flood of job ids never tracks more than `max_jobs`; a finished job's
series go after `retention_s` (its report stays, on disk); a silent job goes after
`idle_retention_s`; a restart loses no report and picks up the jobs it was tracking.

Ages are measured from the envelopes' send times, so the tests date their messages in the past
instead of waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from nissahelpers import Bus, job_story, poll, scrape

from esper.contracts import JobStatusChanged, TelemetryReport
from esper.testing import ServiceProcess

MAX_JOBS = 50
RETENTION_S = 1.5
# Well above what a restart takes on a loaded machine: with 8 s, a fresh-clone CI run restarted
# Nissa after the running job's last message had aged past it, and the job was dropped as idle.
IDLE_RETENTION_S = 30.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nissa-retention")


@pytest.fixture(scope="module")
def nissa(nissa_factory: Callable[..., ServiceProcess], data_dir: Path) -> ServiceProcess:
    return nissa_factory(
        NISSA_DATA_DIR=str(data_dir),
        NISSA_MAX_JOBS=str(MAX_JOBS),
        NISSA_RETENTION_S=str(RETENTION_S),
        NISSA_IDLE_RETENTION_S=str(IDLE_RETENTION_S),
    )


def job_ids(url: str) -> set[str]:
    return scrape(url).label_values("job_id")


def test_a_flood_of_job_ids_never_tracks_more_than_max_jobs(
    nissa: ServiceProcess, bus: Bus
) -> None:
    now = time.time()
    flood = [
        (TelemetryReport(job_id=f"flood-{i}", epoch=0, step=i, kind="step"), now)
        for i in range(5000)
    ]
    bus.publish_all(flood)
    metrics = poll(
        lambda: (m := scrape(nissa.url)).value("esper_job_step", job_id="flood-4999") and m,
        "the last job of the flood",
        deadline_s=60,
    )
    ids = metrics.label_values("job_id")
    assert len(ids) <= MAX_JOBS
    assert {f"flood-{i}" for i in range(4999 - 10, 5000)} <= ids  # the newest are kept
    assert metrics.value("esper_nissa_jobs_dropped_total", reason="capacity") >= 5000 - MAX_JOBS
    assert sum(s.value for s in metrics.of("esper_jobs")) <= MAX_JOBS
    # Jobs only ever heard of through telemetry have no status: not worth a report file.
    assert httpx.get(f"{nissa.url}/reports/jobs/flood-3").status_code == 404
    assert httpx.get(f"{nissa.url}/healthz").status_code == 200


def test_a_finished_jobs_series_are_dropped_after_retention_and_its_report_stays(
    nissa: ServiceProcess, bus: Bus, data_dir: Path
) -> None:
    job = "job-retired"
    # The story ends 6.1 s after t0: it finished (RETENTION_S - 1) seconds ago.
    bus.publish_all(job_story(job, time.time() - 6.1 - (RETENTION_S - 1)))
    poll(lambda: job in job_ids(nissa.url), "the job's series")
    poll(lambda: job not in job_ids(nissa.url), "the job's series dropped", deadline_s=10)
    poll(
        lambda: scrape(nissa.url).value("esper_nissa_jobs_dropped_total", reason="retention"),
        "the job dropped from memory too",
    )
    poll(lambda: (data_dir / "reports" / f"{job}.json").exists(), "the stored report")
    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert report["source"] == "stored" and report["status"] == "SUCCEEDED"
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    page = httpx.get(f"{nissa.url}/reports/jobs/{job}.html")
    assert page.status_code == 200 and 'id="seed-timeline"' in page.text
    listed = httpx.get(f"{nissa.url}/reports/jobs", params={"limit": 1000}).json()["items"]
    assert {"job_id": job, "source": "stored"}.items() <= next(
        i for i in listed if i["job_id"] == job
    ).items()


def test_a_job_nothing_is_heard_from_is_dropped_after_idle_retention(
    nissa: ServiceProcess, bus: Bus
) -> None:
    job = "job-silent"
    bus.publish(
        TelemetryReport(job_id=job, epoch=0, step=5, kind="step"),
        ts=time.time() - IDLE_RETENTION_S + 1.0,
    )
    poll(lambda: job in job_ids(nissa.url), "the silent job's series")
    poll(lambda: job not in job_ids(nissa.url), "the silent job dropped", deadline_s=10)
    assert scrape(nissa.url).value("esper_nissa_jobs_dropped_total", reason="idle") >= 1


def test_a_restart_loses_no_report_and_resumes_running_jobs(
    nissa: ServiceProcess, bus: Bus, data_dir: Path
) -> None:
    job = "job-across-restart"
    story = job_story(job, time.time() - 3)[:7]  # queued … epoch 0 ended, a decision published
    bus.publish_all(story)
    poll(lambda: (data_dir / "reports" / f"{job}.json").exists(), "the running job's snapshot")
    poll(
        lambda: len(httpx.get(f"{nissa.url}/reports/jobs/{job}").json()["decisions"]) == 1,
        "the decision in the report",
    )
    time.sleep(0.5)  # one more snapshot interval: the decision is in the file too
    nissa.restart()
    metrics = scrape(nissa.url)
    assert metrics.value("esper_job_status", job_id=job, status="RUNNING") == 1
    assert metrics.value("esper_job_epoch", job_id=job) == 1
    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert report["source"] == "live" and [e["epoch"] for e in report["epochs"]] == [0]
    assert report["decisions"][0]["action"] == "germinate"
    # The job goes on after the restart: its report continues where it was.
    bus.publish(
        TelemetryReport(
            job_id=job, epoch=1, step=28, kind="epoch", train_loss=0.5, val_accuracy=0.7
        )
    )
    bus.publish(JobStatusChanged(job_id=job, status="SUCCEEDED", previous="RUNNING"))
    poll(
        lambda: scrape(nissa.url).value("esper_job_status", job_id=job, status="SUCCEEDED") == 1,
        "the job's end after the restart",
    )
    report = httpx.get(f"{nissa.url}/reports/jobs/{job}").json()
    assert [e["epoch"] for e in report["epochs"]] == [0, 1]
    assert report["epochs_completed"] == 2

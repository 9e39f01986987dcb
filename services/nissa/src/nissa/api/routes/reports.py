"""Job reports: JSON (`/reports/jobs/{id}`) and a page with charts (`/reports/jobs/{id}.html`).

A tracked job's report is built from memory; a job no longer tracked (past retention, or before
a restart) is served from its stored report. The `.html` route is declared first: a job id may
contain dots, and `{job_id}` alone would otherwise take `abc.html` as an id.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse

from esper.contracts import Page
from esper.service import ApiError, error_responses
from nissa.deps import StateDep, StoreDep
from nissa.report_html import render
from nissa.reports import JobReport, JobSummary, ReportStore
from nissa.state import NissaState

router = APIRouter(prefix="/reports", tags=["reports"])

JobId = Annotated[
    str,
    Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$", description="a job id"),
]


async def _report(job_id: str, state: NissaState, store: ReportStore) -> JobReport:
    job = state.jobs.get(job_id)
    if job is not None:
        return job.to_report(state.kernels)
    stored = await asyncio.to_thread(store.read, job_id)
    if stored is None:
        raise ApiError(
            404,
            "unknown_job",
            f"Nissa has no report of job {job_id!r}: it was never seen on the bus, or its "
            "report is past retention",
            ["path", "job_id"],
        )
    return stored


@router.get("/jobs", response_model=Page[JobSummary])
async def list_reports(
    state: StateDep,
    store: StoreDep,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Page[JobSummary]:
    """Tracked jobs (most recently heard first), then stored reports of the others."""
    live = [job.summary() for job in reversed(state.jobs.values())]
    items = live[:limit]
    if len(items) < limit:
        seen = {s.job_id for s in items}
        stored = await asyncio.to_thread(store.summaries, limit + len(seen))
        items += [s for s in stored if s.job_id not in seen][: limit - len(items)]
    return Page[JobSummary](items=items)


@router.get(
    "/jobs/{job_id}.html",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, **error_responses(404, 422)},
)
async def job_report_page(job_id: JobId, state: StateDep, store: StoreDep) -> HTMLResponse:
    """The job's loss and accuracy curves and its seed timeline, as one self-contained page."""
    report = await _report(job_id, state, store)
    return HTMLResponse(render(report))


@router.get("/jobs/{job_id}", response_model=JobReport, responses=error_responses(404, 422))
async def job_report(job_id: JobId, state: StateDep, store: StoreDep) -> JobReport:
    """Epoch curve, decisions, and every seed slot with its lifecycle and contribution."""
    return await _report(job_id, state, store)

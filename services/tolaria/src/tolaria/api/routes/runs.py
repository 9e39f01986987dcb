"""External runs' side of a job (esper.contracts.runs): a user's own training loop reports to
its job and ends it; Tolaria relays the controller's answers back (tolaria.external)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from esper.contracts import JobView, RunEnd, RunReply, RunReport
from esper.service import RequireToken, error_responses
from tolaria.deps import RelayDep

router = APIRouter(prefix="/jobs", tags=["external runs"])
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]
_ERRORS = error_responses(404, 409, 413, 422)


@router.post(
    "/{job_id}/reports", response_model=RunReply, dependencies=[RequireToken], responses=_ERRORS
)
async def report_run(job_id: JobId, body: RunReport, relay: RelayDep) -> RunReply:
    """An external run's events and report (in that order). At a decision point the reply
    carries the controller's answer, waited for up to the spec's `decision_timeout_s`; 409 once
    the job has ended, or for a job Tolaria trains itself."""
    return await relay.report(job_id, body)


@router.post(
    "/{job_id}/end", response_model=JobView, dependencies=[RequireToken], responses=_ERRORS
)
async def end_run(job_id: JobId, body: RunEnd, relay: RelayDep) -> JobView:
    """End an external run's job as the run says (SUCCEEDED, FAILED or STOPPED); ending an
    ended job changes nothing."""
    return await relay.end(job_id, body)

"""Per-job controller state, and operators' decisions for a job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from esper.policy.models import JobState
from esper.service import ApiError, RequireToken, error_responses
from tamiyo.deps import ControllerDep, StoreDep
from tamiyo.models import DecisionRecord, ManualDecision

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]


@router.get("/{job_id}/controller", response_model=JobState, responses=error_responses(404, 422))
async def get_controller_state(job_id: JobId, store: StoreDep) -> JobState:
    """What Tamiyo knows and decided about the job: plateau tracking, layer signals, seeds under
    evaluation, the germination in flight, cooldown, blueprint records, and its last note."""
    state = await store.state(job_id)
    if state is None:
        raise ApiError(
            404, "unknown_job", f"Tamiyo has no state for job {job_id!r}", ["path", "job_id"]
        )
    return state


@router.post(
    "/{job_id}/decisions",
    response_model=DecisionRecord,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RequireToken],
    responses={200: {"model": DecisionRecord}, **error_responses(404, 409, 422, 503)},
)
async def post_decision(
    job_id: JobId, body: ManualDecision, controller: ControllerDep, response: Response
) -> DecisionRecord:
    """An operator's decision, checked (the contract; the layer must be one the job reported;
    a blueprint must exist in Urza and fit the layer; one germination in flight per job;
    keep / retire / set_alpha name an ACTIVE seed) and published like Tamiyo's own (201). The
    same `decision_id` again returns the first record (200)."""
    record, created = await controller.manual(job_id, body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return record

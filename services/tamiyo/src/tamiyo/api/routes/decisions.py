"""Decisions Tamiyo published (its own and operators'), with the job's answer once it came."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from esper.contracts import Page
from esper.service import ApiError, error_responses
from tamiyo.deps import StoreDep
from tamiyo.models import DecisionRecord

router = APIRouter(prefix="/decisions", tags=["decisions"])
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"


@router.get("", response_model=Page[DecisionRecord], responses=error_responses(422))
async def list_decisions(
    store: StoreDep,
    job_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}$")] = None,
) -> Page[DecisionRecord]:
    """Newest first, of one job or of all; pass `next_cursor` back as `cursor` for the next
    page."""
    records, next_cursor = await store.decisions(
        job_id, limit, int(cursor) if cursor is not None else None
    )
    return Page[DecisionRecord](
        items=records, next_cursor=str(next_cursor) if next_cursor is not None else None
    )


@router.get("/{decision_id}", response_model=DecisionRecord, responses=error_responses(404, 422))
async def get_decision(
    decision_id: Annotated[str, Path(pattern=ID_PATTERN)], store: StoreDep
) -> DecisionRecord:
    record = await store.decision(decision_id)
    if record is None:
        raise ApiError(
            404, "unknown_decision", f"no decision {decision_id!r}", ["path", "decision_id"]
        )
    return record

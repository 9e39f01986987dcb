"""Service health as Nissa sees it from the heartbeats on the health topic."""

from __future__ import annotations

from fastapi import APIRouter

from nissa.deps import StateDep
from nissa.services import ServicesView

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/services", response_model=ServicesView)
async def services(state: StateDep) -> ServicesView:
    """Every service that ever beat (job processes excluded), up while one of its instances beat
    within `down_after_beats` of its own interval; instances with their latest beat."""
    return state.services.view(state.now())

"""The policy: every threshold Tamiyo decides by, shared by every replica."""

from __future__ import annotations

from fastapi import APIRouter

from esper.policy.config import PolicyConfig
from esper.service import ApiError, RequireToken, error_responses
from tamiyo.deps import CatalogueDep, StoreDep
from tamiyo.models import PolicyView

router = APIRouter(prefix="/policy", tags=["policy"])


@router.get("", response_model=PolicyView)
async def get_policy(store: StoreDep) -> PolicyView:
    """The policy in force: the stored one, or this replica's defaults when none was PUT."""
    return await store.policy()


@router.put(
    "",
    response_model=PolicyView,
    dependencies=[RequireToken],
    responses=error_responses(422, 503),
)
async def put_policy(policy: PolicyConfig, store: StoreDep, catalogue: CatalogueDep) -> PolicyView:
    """Replace the policy (omitted fields take their documented defaults). Values outside a
    field's range — a negative patience, a seed cap below zero — and blueprints Urza does not
    have are refused with 422. It applies from the next message every replica handles."""
    for index, name in enumerate(policy.blueprints or []):
        try:
            found = await catalogue.find(name)  # fetches Urza's list again for a new name
        except LookupError as err:
            raise ApiError(
                503, "urza_unavailable", f"cannot check the blueprints: {err}", ["body"]
            ) from None
        if found is None:
            raise ApiError(
                422,
                "unknown_blueprint",
                f"Urza has no blueprint {name!r}",
                ["body", "blueprints", index],
            )
    return await store.put_policy(policy)

"""Blueprints: small networks described as data, which Urza compiles into kernels."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Response, status

from esper.blueprints.compiler import dry_run
from esper.blueprints.spec import BlueprintSpec
from esper.contracts import HostSignature, Page
from esper.exceptions import BlueprintError, CompileError
from esper.service import RequireToken, error_responses
from urza.deps import StoreDep
from urza.errors import InvalidBlueprintError
from urza.store import StoredBlueprint

router = APIRouter(prefix="/blueprints", tags=["blueprints"])

# A blueprint must instantiate, fit and start function-preserving on a typical host of each kind
# it claims, or it is refused at registration rather than at its first compile. A widening one
# is tried on that host widening into another like it.
_TRIAL_HOSTS = {
    "linear": HostSignature(kind="linear", in_features=16, out_features=16),
    "conv2d": HostSignature(
        kind="conv2d", in_features=16, out_features=16, kernel_size=(3, 3), padding=(1, 1)
    ),
    "conv1d": HostSignature(
        kind="conv1d", in_features=16, out_features=16, kernel_size=(1, 3), padding=(0, 1)
    ),
}
_ERRORS = error_responses(404, 409, 422)


def _trial(spec: BlueprintSpec) -> None:
    try:
        for kind in spec.hosts:
            host = _TRIAL_HOSTS[kind]
            dry_run(spec, host.widening(host) if spec.widens else host)
    except (BlueprintError, CompileError) as err:
        raise InvalidBlueprintError(str(err)) from err


@router.post(
    "",
    response_model=StoredBlueprint,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RequireToken],
    responses={200: {"model": StoredBlueprint}, **_ERRORS},
)
async def register_blueprint(
    spec: BlueprintSpec, store: StoreDep, response: Response
) -> StoredBlueprint:
    """Register a blueprint (201), or find the identical one already registered (200)."""
    await asyncio.to_thread(_trial, spec)
    record, created = await asyncio.to_thread(store.put_blueprint, spec)
    if not created:
        response.status_code = status.HTTP_200_OK
    return record


@router.get("", response_model=Page[StoredBlueprint])
async def list_blueprints(store: StoreDep) -> Page[StoredBlueprint]:
    """The latest version of every blueprint, built-ins included, by name."""
    records = await asyncio.to_thread(store.list_blueprints)
    return Page[StoredBlueprint](items=records, total=len(records))


@router.get("/{name}", response_model=StoredBlueprint, responses=_ERRORS)
async def get_blueprint(
    name: str,
    store: StoreDep,
    version: int | None = Query(default=None, ge=1, description="latest when omitted"),
) -> StoredBlueprint:
    return await asyncio.to_thread(store.get_blueprint, name, version)

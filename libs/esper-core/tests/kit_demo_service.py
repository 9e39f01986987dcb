"""A tiny service built with the service kit, for test_service_kit.py.

The tests import `build_app` to run it in-process under uvicorn; as a module
(`PYTHONPATH=<tests dir> python -m kit_demo_service`) it is a real service process configured
from `KITDEMO_*` and `ESPER_BUS_*`, the way a real service starts. `KITDEMO_CRASH=1` makes it fail
at start, for the start-failure path of `ServiceProcess`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from esper.contracts.api import Check
from esper.service import (
    ApiError,
    RequireToken,
    ServiceSettings,
    create_app,
    error_responses,
    serve,
)

SERVICE = "kit-demo"
VERSION = "1.2.3"
CRASH_MESSAGE = "kit demo refuses to start: KITDEMO_CRASH is set"


class KitSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KITDEMO_", extra="ignore", frozen=True)

    port: int = Field(default=8099, ge=0, le=65535)


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=10_000)
    count: int = Field(default=1, ge=0)


class ItemOut(BaseModel):
    id: int
    name: str
    count: int


@dataclass
class Probe:
    """What the tests flip and count: the custom readiness check's result, and handler calls."""

    result: Check = True
    calls: Counter[str] = field(default_factory=Counter)


def demo_router(probe: Probe) -> APIRouter:
    router = APIRouter()

    @router.get("/items/{item_id}", response_model=ItemOut)
    async def get_item(item_id: int) -> ItemOut:
        probe.calls["get_item"] += 1
        return ItemOut(id=item_id, name=f"item-{item_id}", count=1)

    @router.post(
        "/items",
        response_model=ItemOut,
        dependencies=[RequireToken],
        responses=error_responses(401, 403, 413, 422),
    )
    async def create_item(item: ItemIn) -> ItemOut:
        probe.calls["create_item"] += 1
        return ItemOut(id=1, name=item.name, count=item.count)

    @router.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        probe.calls["upload"] += 1
        return {"received": len(await request.body())}

    # A second route on /upload's path: a 405 there allows the methods of both.
    @router.get("/upload")
    async def upload_limit(request: Request) -> dict[str, int]:
        return {"limit": request.app.state.settings.max_body_bytes}

    @router.post("/form")
    async def form(request: Request) -> dict[str, int]:
        return {"fields": len(await request.form())}

    @router.post("/parse")
    async def parse(request: Request) -> dict[str, str]:
        """Parses its body itself, as routes that take JSON or YAML do."""
        return {"type": type(json.loads(await request.body())).__name__}

    @router.get("/report", response_class=HTMLResponse, responses=error_responses(404, 422))
    async def report(missing: bool = False) -> HTMLResponse:
        """A route whose answer is text, and whose errors are JSON like every route's."""
        if missing:
            raise ApiError(404, "not_found", "no such report")
        return HTMLResponse("<p>report</p>")

    @router.post("/big")
    async def big(request: Request) -> dict[str, int]:
        probe.calls["big"] += 1
        return {"received": len(await request.body())}

    @router.get("/conflict")
    async def conflict() -> None:
        probe.calls["conflict"] += 1
        raise ApiError(
            409,
            "conflict",
            "an item named 'x' exists",
            ["body", "name"],
            headers={"X-Existing-Id": "42"},
            existing_id=42,
        )

    @router.get("/crash")
    async def crash() -> None:
        probe.calls["crash"] += 1
        raise RuntimeError("secret-internal-detail-7f3a")

    return router


def build_app(settings: ServiceSettings, probe: Probe, big_limit: int = 64 * 1024) -> FastAPI:
    async def custom(app: FastAPI) -> Check:
        return probe.result

    return create_app(
        service=SERVICE,
        version=VERSION,
        settings=settings,
        routers=[demo_router(probe)],
        readiness={"custom": custom},
        body_limits={"/big": big_limit},
    )


def main() -> None:
    if os.environ.get("KITDEMO_CRASH"):
        raise RuntimeError(CRASH_MESSAGE)
    settings = KitSettings()
    serve(build_app(settings, Probe()), settings)


if __name__ == "__main__":
    main()

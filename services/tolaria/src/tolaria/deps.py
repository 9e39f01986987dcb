"""Dependencies routes declare with `Annotated`; tests override `get_settings`."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request

from tolaria.jobstore import JobStore
from tolaria.settings import TolariaSettings


@lru_cache
def get_settings() -> TolariaSettings:
    return TolariaSettings()


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.jobs
    return store


SettingsDep = Annotated[TolariaSettings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]

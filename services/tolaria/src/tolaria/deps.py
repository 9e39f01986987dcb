"""Dependencies routes declare with `Annotated`; the settings are those the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from esper.service import settings_dependency
from tolaria.external import RunRelay
from tolaria.jobstore import JobStore
from tolaria.settings import TolariaSettings

get_settings = settings_dependency(TolariaSettings)


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.jobs
    return store


SettingsDep = Annotated[TolariaSettings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]


def get_relay(request: Request, store: StoreDep, settings: SettingsDep) -> RunRelay:
    return RunRelay(store, request.app.state.producer, settings)


RelayDep = Annotated[RunRelay, Depends(get_relay)]

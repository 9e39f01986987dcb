"""Dependencies routes declare with `Annotated`; the settings are those the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from esper.service import settings_dependency
from nissa.reports import ReportStore
from nissa.settings import NissaSettings
from nissa.state import NissaState

get_settings = settings_dependency(NissaSettings)


def get_state(request: Request) -> NissaState:
    state: NissaState = request.app.state.nissa
    return state


def get_store(request: Request) -> ReportStore:
    store: ReportStore = request.app.state.reports
    return store


SettingsDep = Annotated[NissaSettings, Depends(get_settings)]
StateDep = Annotated[NissaState, Depends(get_state)]
StoreDep = Annotated[ReportStore, Depends(get_store)]

"""Dependencies routes declare with `Annotated`; `create_app` overrides `get_settings`."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request

from nissa.reports import ReportStore
from nissa.settings import NissaSettings
from nissa.state import NissaState


@lru_cache
def get_settings() -> NissaSettings:
    return NissaSettings()


def get_state(request: Request) -> NissaState:
    state: NissaState = request.app.state.nissa
    return state


def get_store(request: Request) -> ReportStore:
    store: ReportStore = request.app.state.reports
    return store


SettingsDep = Annotated[NissaSettings, Depends(get_settings)]
StateDep = Annotated[NissaState, Depends(get_state)]
StoreDep = Annotated[ReportStore, Depends(get_store)]

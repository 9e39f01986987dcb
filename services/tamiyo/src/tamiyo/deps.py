"""Dependencies routes declare with `Annotated`; the settings are those the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from esper.service import settings_dependency
from tamiyo.catalogue import Catalogue
from tamiyo.controller import Controller
from tamiyo.settings import TamiyoSettings
from tamiyo.store import TamiyoStore

get_settings = settings_dependency(TamiyoSettings)


def get_store(request: Request) -> TamiyoStore:
    store: TamiyoStore = request.app.state.store
    return store


def get_controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


def get_catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.app.state.controller.catalogue
    return catalogue


SettingsDep = Annotated[TamiyoSettings, Depends(get_settings)]
StoreDep = Annotated[TamiyoStore, Depends(get_store)]
ControllerDep = Annotated[Controller, Depends(get_controller)]
CatalogueDep = Annotated[Catalogue, Depends(get_catalogue)]

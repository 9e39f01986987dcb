"""Dependencies routes declare with `Annotated`; the settings are those the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from esper.service import settings_dependency
from urza.compiler import CompileService
from urza.settings import UrzaSettings
from urza.store import KernelStore

get_settings = settings_dependency(UrzaSettings)


def get_store(request: Request) -> KernelStore:
    store: KernelStore = request.app.state.store
    return store


def get_compiler(request: Request) -> CompileService:
    compiler: CompileService = request.app.state.compiler
    return compiler


SettingsDep = Annotated[UrzaSettings, Depends(get_settings)]
StoreDep = Annotated[KernelStore, Depends(get_store)]
CompilerDep = Annotated[CompileService, Depends(get_compiler)]

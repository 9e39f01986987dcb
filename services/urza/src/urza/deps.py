"""Dependencies routes declare with `Annotated`; tests override `get_settings`."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request

from urza.compiler import CompileService
from urza.settings import UrzaSettings
from urza.store import KernelStore


@lru_cache
def get_settings() -> UrzaSettings:
    return UrzaSettings()


def get_store(request: Request) -> KernelStore:
    store: KernelStore = request.app.state.store
    return store


def get_compiler(request: Request) -> CompileService:
    compiler: CompileService = request.app.state.compiler
    return compiler


SettingsDep = Annotated[UrzaSettings, Depends(get_settings)]
StoreDep = Annotated[KernelStore, Depends(get_store)]
CompilerDep = Annotated[CompileService, Depends(get_compiler)]

"""The settings dependency every service's routes take their settings from.

`create_app` keeps the settings it was given on `app.state.settings`; the dependency reads them
from there. A test builds the app with its own settings and the routes see exactly those, with no
cache to clear and no override to install (`app.dependency_overrides` still works as usual).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request

from esper.service.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def settings_dependency(cls: type[S]) -> Callable[[Request], S]:
    """`get_settings = settings_dependency(UrzaSettings)`, then
    `SettingsDep = Annotated[UrzaSettings, Depends(get_settings)]`."""

    def get_settings(request: Request) -> S:
        settings = request.app.state.settings
        if not isinstance(settings, cls):
            raise TypeError(f"the app was built with {type(settings).__name__}, not {cls.__name__}")
        return settings

    return get_settings

"""The service kit: what Tolaria, Tamiyo, Nissa and Urza build their FastAPI apps with."""

from esper.service.app import ReadinessCheck, create_app, run_checks
from esper.service.auth import RequireToken, require_token
from esper.service.deps import settings_dependency
from esper.service.errors import ApiError, ErrorMapping, ErrorTable, error_responses, path_param
from esper.service.logs import JsonFormatter, configure_logging
from esper.service.loops import Periodic, run_every
from esper.service.serve import serve
from esper.service.settings import ServiceSettings, UrzaLinkSettings

__all__ = [
    "ApiError",
    "ErrorMapping",
    "ErrorTable",
    "JsonFormatter",
    "Periodic",
    "ReadinessCheck",
    "RequireToken",
    "ServiceSettings",
    "UrzaLinkSettings",
    "configure_logging",
    "create_app",
    "error_responses",
    "path_param",
    "require_token",
    "run_checks",
    "run_every",
    "serve",
    "settings_dependency",
]

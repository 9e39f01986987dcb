"""The service kit: what Tolaria, Tamiyo, Nissa and Urza build their FastAPI apps with."""

from esper.service.app import ReadinessCheck, create_app, run_checks
from esper.service.auth import RequireToken, require_token
from esper.service.errors import ApiError, error_responses
from esper.service.logs import JsonFormatter, configure_logging
from esper.service.serve import serve
from esper.service.settings import ServiceSettings

__all__ = [
    "ApiError",
    "JsonFormatter",
    "ReadinessCheck",
    "RequireToken",
    "ServiceSettings",
    "configure_logging",
    "create_app",
    "error_responses",
    "require_token",
    "run_checks",
    "serve",
]

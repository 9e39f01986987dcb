"""Run a service under uvicorn with the kit's logging (`python -m <service>` calls this)."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from esper.service.logs import configure_logging
from esper.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    configure_logging(
        app.state.service, settings.instance, settings.log_level, json_logs=settings.log_json
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the kit's handlers: uvicorn's own config would replace them
        access_log=False,  # the kit logs each request itself, with its route and duration
        timeout_graceful_shutdown=10,
    )

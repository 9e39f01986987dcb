"""Run a service under uvicorn with the kit's logging (`python -m <service>` calls this)."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from esper.service.logs import configure_logging
from esper.service.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings | None = None) -> None:
    """`settings`: those the app was built with unless given."""
    chosen: ServiceSettings = settings if settings is not None else app.state.settings
    configure_logging(
        app.state.service, chosen.instance, chosen.log_level, json_logs=chosen.log_json
    )
    uvicorn.run(
        app,
        host=chosen.host,
        port=chosen.port,
        log_config=None,  # keep the kit's handlers: uvicorn's own config would replace them
        access_log=False,  # the kit logs each request itself, with its route and duration
        timeout_graceful_shutdown=10,
    )

"""Settings every service shares; each service subclasses with its own env prefix.

```python
class UrzaSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="URZA_", extra="ignore", frozen=True)
    port: int = 8004
```
The bus is configured once for the whole deployment (`ESPER_BUS_*`), not per service.
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.bus.settings import BusSettings


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_SERVICE_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    instance: str = Field(
        default_factory=lambda: f"{socket.gethostname()[:60]}-{__import__('os').getpid()}",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$",
    )
    api_token: SecretStr | None = None
    """Bearer token required on mutating routes; None or empty (compose's `${TOKEN:-}`) leaves
    them open (a local stack)."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=3600)
    heartbeat: bool = True
    """Publish a heartbeat on the health topic (off for a process that runs without Redis)."""
    bus: BusSettings = Field(default_factory=BusSettings)

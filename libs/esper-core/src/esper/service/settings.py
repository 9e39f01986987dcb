"""Settings every service shares; each service subclasses with its own env prefix.

```python
class UrzaSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="URZA_", extra="ignore", frozen=True)
    port: int = 8004
```
The bus is configured once for the whole deployment (`ESPER_BUS_*`), not per service. A service
that calls Urza mixes in `UrzaLinkSettings` as well.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.bus.settings import BusSettings
from esper.client.urza import DEFAULT_TIMEOUT_S, DEFAULT_URL, UrzaClient


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


def _default_urza_url() -> str | None:
    return os.environ.get("ESPER_URZA_URL", DEFAULT_URL) or None


class UrzaLinkSettings(BaseModel):
    """How a service reaches Urza, the same in every service that does (Tolaria, Tamiyo, Nissa):
    `<PREFIX>URZA_URL`, `<PREFIX>URZA_TOKEN` and `<PREFIX>URZA_TIMEOUT_S`, under the service's
    own prefix.

    ```python
    class TamiyoSettings(ServiceSettings, UrzaLinkSettings):
        model_config = SettingsConfigDict(env_prefix="TAMIYO_", extra="ignore", frozen=True)
    ```
    """

    urza_url: str | None = Field(default_factory=_default_urza_url)
    """Urza's base URL; empty: no Urza. Unset, it is `ESPER_URZA_URL` (the variable the CLI and
    the clients read, so one variable can point a whole local stack at Urza), else Urza's default
    port on localhost."""
    urza_token: SecretStr | None = None
    """The bearer token sent to Urza: the value of Urza's `URZA_API_TOKEN`."""
    urza_timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=600)
    """Bound of each request to Urza; compiles and uploads, which take longer, have their own."""

    @field_validator("urza_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        # Compose writes an unset variable as "", which must mean "no Urza", not a relative URL.
        if value is None:
            return None
        return value.strip().rstrip("/") or None

    @property
    def urza_token_value(self) -> str | None:
        return self.urza_token.get_secret_value() if self.urza_token else None

    def urza_client(self, **options: Any) -> UrzaClient | None:
        """A client of the configured Urza (`options` as UrzaClient takes them), or None when
        there is no Urza. Create it on the event loop that will use it."""
        if not self.urza_url:
            return None
        return UrzaClient(
            self.urza_url, token=self.urza_token_value, timeout_s=self.urza_timeout_s, **options
        )

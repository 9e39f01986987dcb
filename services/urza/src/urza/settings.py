"""Urza's settings: `URZA_*` environment variables (the bus is `ESPER_BUS_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from esper.service import ServiceSettings


class UrzaSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="URZA_", extra="ignore", frozen=True)

    @model_validator(mode="after")
    def _admin_token_is_its_own(self) -> UrzaSettings:
        admin = self.admin_token_value
        if admin is not None and self.api_token and admin == self.api_token.get_secret_value():
            # Everyone who may upload holds the API token; the admin token must say more.
            raise ValueError("URZA_ADMIN_TOKEN must differ from URZA_API_TOKEN")
        return self

    @property
    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() or None if self.admin_token else None

    port: int = Field(default=8004, ge=0, le=65535)
    data_dir: Path = Path("var/urza")
    """SQLite metadata (`urza.sqlite3`) and content-addressed artifacts (`blobs/`)."""
    signing_key: SecretStr | None = None
    """HMAC-SHA256 key: artifacts are signed with it, and caches holding it verify them."""
    admin_token: SecretStr | None = None
    """Sent as `X-Esper-Admin-Token` on an upload, it lets the uploader store a kernel in a
    format whose loading runs code that cannot be inspected first (TorchScript); without it such
    uploads are refused. Unset or empty: nobody may. Must differ from `api_token`."""
    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    max_features: int = Field(default=16384, ge=1)
    """Largest host width a compile or an upload may name; a bigger one is refused, not queued."""
    max_kernel_params: int = Field(default=1 << 28, ge=1)
    """A compile whose kernel (the blueprint instantiated for the host) would have more
    parameters is refused with 422 before it is queued."""
    max_kernel_memory_bytes: int = Field(default=4 << 30, ge=1 << 20)
    """A compile whose estimated memory (weights, the example input and every op's output on
    it) is over this is refused with 422 before it is queued."""
    compile_workers: int = Field(default=1, ge=1, le=16)
    """Compiles run in a thread pool off the event loop. torch.export keeps global tracing state,
    so one worker (compiles queue up) is the safe default."""
    max_queued_compiles: int = Field(default=64, ge=1)
    """Compiles waiting beyond this are refused with 429 instead of piling up."""

"""Urza's settings: `URZA_*` environment variables (the bus is `ESPER_BUS_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from esper.service import ServiceSettings


class UrzaSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="URZA_", extra="ignore", frozen=True)

    port: int = Field(default=8004, ge=0, le=65535)
    data_dir: Path = Path("var/urza")
    """SQLite metadata (`urza.sqlite3`) and content-addressed artifacts (`blobs/`)."""
    signing_key: SecretStr | None = None
    """HMAC-SHA256 key: artifacts are signed with it, and caches holding it verify them."""
    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    max_features: int = Field(default=16384, ge=1)
    """Largest host width a compile or an upload may name; a bigger one is refused, not queued."""
    compile_workers: int = Field(default=1, ge=1, le=16)
    """Compiles run in a thread pool off the event loop. torch.export keeps global tracing state,
    so one worker (compiles queue up) is the safe default."""
    max_queued_compiles: int = Field(default=64, ge=1)
    """Compiles waiting beyond this are refused with 429 instead of piling up."""

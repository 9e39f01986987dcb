"""Tolaria's settings: `TOLARIA_*` environment variables (the bus is `ESPER_BUS_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from esper.service import ServiceSettings, UrzaLinkSettings


class TolariaSettings(ServiceSettings, UrzaLinkSettings):
    model_config = SettingsConfigDict(env_prefix="TOLARIA_", extra="ignore", frozen=True)

    port: int = Field(default=8001, ge=0, le=65535)
    data_dir: Path = Path("data")
    """Where file data sets live (`dataset.path` is relative to it): the operator's mount."""
    work_dir: Path = Path("var/tolaria")
    """Checkpoints (`jobs/<id>/checkpoint.pt`), shared by every replica."""
    workers: int = Field(default=1, ge=0, le=64)
    """Jobs this replica trains at once (each in its own process); 0: an API-only replica."""
    job_claim_idle_ms: int = Field(default=15_000, ge=500)
    """A queued job whose worker stopped renewing its claim this long ago is taken over by
    another worker, which resumes it from its last checkpoint."""
    kernel_signing_key: SecretStr | None = None
    """Urza's signing key: artifacts whose HMAC does not match are refused."""
    trust_torchscript: bool = False
    """Load TorchScript kernels that Urza does not vouch for (`KernelMeta.vouched_by`): their
    loading runs code from the archive before it can be inspected. Off: only TorchScript that
    Urza compiled or took from an admin loads (services/urza/README.md, "Kernel trust")."""
    stop_poll_s: float = Field(default=0.2, gt=0, le=10)
    max_log_lines: int = Field(default=10_000, ge=100)
    max_events: int = Field(default=20_000, ge=100)
    checkpoint_download_bytes: int = Field(default=2 << 30, ge=1)
    max_job_memory_bytes: int = Field(default=8 << 30, ge=1 << 20)
    """A job whose estimated peak memory (parameters, gradients, optimizer state, activations
    of a batch, the data set) is over this is refused with 422 when it is submitted."""
    max_spec_bytes: int = Field(default=256 << 10, ge=4096)
    """Largest `POST /jobs` body: a job spec is a few KiB; a bigger body is refused with 413
    before it is read, so no parse of a huge document ever starts."""
    external_idle_s: float = Field(default=900.0, gt=0)
    """An external run (`esper.session(..., controller="stack")`) that sends no report this
    long is taken for dead: its job ends FAILED. Each report renews the lease."""
    external_sweep_s: float = Field(default=30.0, gt=0)
    """How often the runs' leases are looked at."""
    allow_user_code: bool | Literal["with_token"] = False
    """Run jobs whose model or dataset is the user's Python code (`kind: python`, uploaded or
    under the data dir): that code runs with the job process's rights, so only where every
    holder of the API token may run code. `with_token`: only when `api_token` is set (what
    docker-compose uses). Off: such jobs are refused with 403."""
    max_code_bytes: int = Field(default=16 << 20, ge=1024)
    """Largest code zip sent with a job (413 above)."""
    max_code_unpacked_bytes: int = Field(default=64 << 20, ge=1024)
    """Largest total of a code zip's unpacked files (413 above)."""
    max_code_files: int = Field(default=2000, ge=1)
    """Most entries in a code zip (413 above)."""
    user_code_check_s: float = Field(default=30.0, gt=0, le=600)
    """Time limit of the check of a job's entrypoints at submission (import, call, shapes);
    past it the check process is killed and the job refused with 422."""

    executor: Literal["local", "ray"] = "local"
    """Where jobs train: `local`, a process of this replica's workers (jobs of one worker
    only); `ray`, a Ray Train run on the cluster at `ray_address` (`tolaria[ray]`)."""
    ray_address: str | None = None
    """The Ray cluster (`host:port` of its head, or `ray://host:10001` for Ray Client); None:
    a local Ray started for the job."""
    ray_auth_token: SecretStr | None = None
    """The cluster's token (Ray 2.60 clusters authenticate with one): given to Ray as
    RAY_AUTH_TOKEN, never logged."""

    @property
    def user_code_allowed(self) -> bool:
        if self.allow_user_code == "with_token":
            return self.api_token is not None and bool(self.api_token.get_secret_value())
        return self.allow_user_code is True

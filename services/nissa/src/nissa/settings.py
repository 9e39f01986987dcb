"""Nissa's settings: `NISSA_*` environment variables (the bus is `ESPER_BUS_*`).

Every bound on what Nissa keeps in memory is here, because a metric label or a report entry that
grows with its input (a flood of job ids, a job with a million epochs) would take Nissa down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from esper.service import ServiceSettings, UrzaLinkSettings


class NissaSettings(ServiceSettings, UrzaLinkSettings):
    model_config = SettingsConfigDict(env_prefix="NISSA_", extra="ignore", frozen=True)

    port: int = Field(default=8003, ge=0, le=65535)
    data_dir: Path = Path("var/nissa")
    """Job reports (`reports/<job_id>.json`): finished jobs' reports and running jobs' snapshots,
    so a restart loses neither."""
    group: str = Field(default="nissa", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    """Nissa's consumer group on every topic. Nissa aggregates in memory, so run one replica
    per group: two replicas of one group would each see half of the messages."""

    # ---- jobs: what is tracked, and for how long
    retention_s: float = Field(default=3600.0, gt=0)
    """A finished job's series (and in-memory report) are dropped this long after it finished."""
    idle_retention_s: float = Field(default=3600.0, gt=0)
    """A job nothing was heard from (no telemetry, event or job heartbeat) for this long is
    dropped too: a job whose end was never reported, or a job id that was only ever garbage."""
    max_jobs: int = Field(default=1000, ge=1)
    """Hard bound on tracked jobs: past it the oldest finished job is dropped, then the oldest."""
    max_seeds_per_job: int = Field(default=64, ge=1)
    max_decisions_per_job: int = Field(default=500, ge=1)
    max_epoch_points: int = Field(default=2000, ge=2)
    """Epoch points kept per job for its curve; beyond it, every other older point is dropped."""
    max_step_points: int = Field(default=1000, ge=2)
    max_transitions_per_seed: int = Field(default=200, ge=2)

    # ---- reports on disk
    report_retention_s: float = Field(default=7 * 86400.0, gt=0)
    max_reports: int = Field(default=10_000, ge=1)
    snapshot_interval_s: float = Field(default=10.0, gt=0)

    # ---- service health
    service_down_after_beats: int = Field(default=3, ge=1)
    """An instance is down when no heartbeat came for this many of its own intervals."""
    max_services: int = Field(default=64, ge=1)
    max_instances_per_service: int = Field(default=64, ge=1)
    instance_retention_s: float = Field(default=3600.0, gt=0)
    """An instance silent this long is forgotten (its service stays, down if none is left)."""

    # ---- the bus
    bus_poll_interval_s: float = Field(default=5.0, gt=0)
    """How often consumer-group lag and pending counts and the dead-letter stream are read."""
    lag_count_cap: int = Field(default=100_000, ge=1)
    """On Redis < 7 (no `lag` in XINFO GROUPS) lag is counted entry by entry, up to this."""
    housekeeping_interval_s: float = Field(default=1.0, gt=0)

    # ---- kernels (for "parameters added"; Urza, `NISSA_URZA_*`, is asked when a kernel's
    # `kernel.ready` event was not seen)
    max_kernels: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.retention_s > self.report_retention_s:
            raise ValueError("report_retention_s must be at least retention_s")
        return self

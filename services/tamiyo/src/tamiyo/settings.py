"""Tamiyo's settings: `TAMIYO_*` environment variables (the bus is `ESPER_BUS_*`).

The policy's defaults (`esper.policy.PolicyConfig`) are `TAMIYO_<FIELD>` variables too
(`TAMIYO_WARMUP_EPOCHS`, see `PolicyDefaults`), or one JSON object in `TAMIYO_POLICY`; a policy
PUT through the API replaces them for every replica.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.policy.config import PolicyConfig
from esper.service import ServiceSettings, UrzaLinkSettings


class PolicyDefaults(PolicyConfig, BaseSettings):
    """The defaults of this replica: PolicyConfig's, overridden by `TAMIYO_<FIELD>` variables."""

    model_config = SettingsConfigDict(env_prefix="TAMIYO_", extra="ignore", frozen=True)


def policy_from_env() -> PolicyConfig:
    return PolicyConfig.model_validate(PolicyDefaults().model_dump())


class TamiyoSettings(ServiceSettings, UrzaLinkSettings):
    model_config = SettingsConfigDict(env_prefix="TAMIYO_", extra="ignore", frozen=True)

    port: int = Field(default=8002, ge=0, le=65535)
    urza_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """Shorter than the link's default: a decision waits for Urza when nothing is cached yet.
    Without Urza (`TAMIYO_URZA_URL` empty) Tamiyo chooses from the built-in blueprints only."""
    catalogue_ttl_s: float = Field(default=30.0, gt=0, le=86_400)
    """How long Urza's blueprint list is used before it is fetched again (in the background)."""
    max_report_age_s: float = Field(default=600.0, gt=0)
    """An epoch report older than this (by its envelope's `ts`) updates the job's state but
    triggers no decision: the job has moved on since it was sent."""
    state_ttl_s: int = Field(default=7 * 86_400, ge=60)
    """A job's controller state and decision records expire this long after their last write."""
    max_decisions: int = Field(default=10_000, ge=10)
    """Decisions `GET /decisions` can list across all jobs (the oldest are dropped)."""
    max_job_decisions: int = Field(default=1_000, ge=10)
    policy: PolicyConfig = Field(default_factory=policy_from_env)
    """This replica's default policy, until one is PUT."""

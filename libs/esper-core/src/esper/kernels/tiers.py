"""tiered_cache: the usual KernelCache of a service, memory → Redis → Urza."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from esper.client.urza import DEFAULT_TIMEOUT_S
from esper.exceptions import ConfigError
from esper.kernels.cache import KernelCache, KernelSource
from esper.kernels.http_tier import UrzaKernelTier
from esper.kernels.redis_tier import RedisKernelTier


def tiered_cache(
    *,
    redis_url: str | None = None,
    urza_url: str | None = None,
    urza_token: str | None = None,
    urza_timeout_s: float = DEFAULT_TIMEOUT_S,
    signing_key: bytes | None = None,
    max_bytes: int = 256 << 20,
    extra_sources: Sequence[KernelSource] = (),
    trust_torchscript: bool = False,
) -> KernelCache:
    """A KernelCache asking memory, then Redis, then Urza, then `extra_sources`, skipping the
    tiers not configured. Artifacts found in a later tier are written back to Redis.
    `trust_torchscript`: see KernelCache (off: only TorchScript that Urza vouches for loads)."""
    if urza_token is not None and urza_url is None:
        raise ConfigError("urza_token is given but urza_url is not")
    sources: list[KernelSource] = []
    if redis_url:
        sources.append(RedisKernelTier(redis_url))
    if urza_url:
        sources.append(UrzaKernelTier(urza_url, token=urza_token, timeout_s=urza_timeout_s))
    sources.extend(extra_sources)
    # The cache keeps its counters by tier name: two tiers of one name would share them.
    repeated = sorted(name for name, n in Counter(s.name for s in sources).items() if n > 1)
    if repeated:
        raise ConfigError(f"two cache tiers share the name(s) {', '.join(repeated)}")
    return KernelCache(
        sources,
        max_bytes=max_bytes,
        signing_key=signing_key,
        trust_torchscript=trust_torchscript,
    )

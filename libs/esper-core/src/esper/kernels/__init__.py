"""Kernels: artifacts, their verification, the executor, the cache and its remote tiers."""

from typing import TYPE_CHECKING

from esper._lazy import lazy_exports

if TYPE_CHECKING:
    from esper.contracts.kernels import KernelMeta
    from esper.contracts.vocabulary import KERNEL_ID_RE, KernelFormat
    from esper.kernels.artifact import KernelArtifact, digest_of, sign, verify
    from esper.kernels.cache import CachedKernel, KernelCache, KernelSource
    from esper.kernels.executor import KernelExecutor, clone_module, deserialize, serialize
    from esper.kernels.http_tier import HttpTierStats, UrzaKernelTier
    from esper.kernels.redis_tier import RedisKernelTier, RedisTierStats
    from esper.kernels.tiers import tiered_cache

__all__ = [
    "KERNEL_ID_RE",
    "CachedKernel",
    "HttpTierStats",
    "KernelArtifact",
    "KernelCache",
    "KernelExecutor",
    "KernelFormat",
    "KernelMeta",
    "KernelSource",
    "RedisKernelTier",
    "RedisTierStats",
    "UrzaKernelTier",
    "clone_module",
    "deserialize",
    "digest_of",
    "serialize",
    "sign",
    "tiered_cache",
    "verify",
]

_WHERE = {
    # The wire types are contracts; they are here too because they were before they moved.
    "KERNEL_ID_RE": "esper.contracts.vocabulary",
    "KernelFormat": "esper.contracts.vocabulary",
    "KernelMeta": "esper.contracts.kernels",
    "KernelArtifact": "esper.kernels.artifact",
    "digest_of": "esper.kernels.artifact",
    "sign": "esper.kernels.artifact",
    "verify": "esper.kernels.artifact",
    "CachedKernel": "esper.kernels.cache",
    "KernelCache": "esper.kernels.cache",
    "KernelSource": "esper.kernels.cache",
    "KernelExecutor": "esper.kernels.executor",
    "clone_module": "esper.kernels.executor",
    "deserialize": "esper.kernels.executor",
    "serialize": "esper.kernels.executor",
    "HttpTierStats": "esper.kernels.http_tier",
    "UrzaKernelTier": "esper.kernels.http_tier",
    "RedisKernelTier": "esper.kernels.redis_tier",
    "RedisTierStats": "esper.kernels.redis_tier",
    "tiered_cache": "esper.kernels.tiers",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

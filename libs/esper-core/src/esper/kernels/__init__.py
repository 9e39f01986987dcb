"""Kernels: artifacts, their verification, the executor, the cache and its remote tiers."""

from esper.kernels.artifact import (
    KERNEL_ID_RE,
    KernelArtifact,
    KernelFormat,
    KernelMeta,
    digest_of,
    sign,
    verify,
)
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

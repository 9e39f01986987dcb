"""Kernels: artifacts, their verification, the executor and the cache."""

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

__all__ = [
    "KERNEL_ID_RE",
    "CachedKernel",
    "KernelArtifact",
    "KernelCache",
    "KernelExecutor",
    "KernelFormat",
    "KernelMeta",
    "KernelSource",
    "clone_module",
    "deserialize",
    "digest_of",
    "serialize",
    "sign",
    "verify",
]

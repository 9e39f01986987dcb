"""Kernel artifacts: the bytes, their metadata, and the checks that come before deserializing."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from esper.contracts.kernels import KernelMeta
from esper.exceptions import DigestMismatchError, SignatureMismatchError


def kernel_id_for(payload: dict[str, Any]) -> str:
    """A stable id from canonical JSON: the same compile input always names the same kernel."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "krn_" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class KernelArtifact:
    meta: KernelMeta
    data: bytes

    def signed(self, key: bytes) -> KernelArtifact:
        return KernelArtifact(
            self.meta.model_copy(update={"hmac_sha256": sign(self.meta, key)}), self.data
        )


def _message(meta: KernelMeta) -> bytes:
    # The signature binds the id to the digest, and the digest to the bytes; and who vouches for
    # code the bytes run at load, so a cache tier cannot grant that trust. Unvouched artifacts
    # keep the message they were signed with before the field existed.
    message = f"{meta.kernel_id}\n{meta.digest}"
    if meta.vouched_by is not None:
        message += f"\nvouched-by:{meta.vouched_by}"
    return message.encode()


def sign(meta: KernelMeta, key: bytes) -> str:
    return hmac.new(key, _message(meta), hashlib.sha256).hexdigest()


def verify(artifact: KernelArtifact, key: bytes | None = None) -> None:
    """Raise unless the bytes match the digest and, when a key is given, the HMAC matches."""
    meta = artifact.meta
    actual = digest_of(artifact.data)
    if actual != meta.digest or len(artifact.data) != meta.size_bytes:
        raise DigestMismatchError(
            f"kernel {meta.kernel_id}: artifact digest {actual} ({len(artifact.data)} bytes) does "
            f"not match the recorded {meta.digest} ({meta.size_bytes} bytes)"
        )
    if key is None:
        return
    if not meta.hmac_sha256:
        raise SignatureMismatchError(f"kernel {meta.kernel_id}: artifact is unsigned")
    if not hmac.compare_digest(meta.hmac_sha256, sign(meta, key)):
        raise SignatureMismatchError(f"kernel {meta.kernel_id}: HMAC signature does not match")

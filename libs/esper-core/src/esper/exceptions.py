"""Every error Esper raises on purpose.

    EsperError
    ├── ConfigError                     a bad argument value (blend, ramp length)     ValueError
    ├── UnknownLayerError               no wrapped layer of that name                 LookupError
    ├── UnsupportedHostError            a module Kasmina cannot wrap                  TypeError
    ├── SeedIndexError                  seed index outside [0, seeds_per_layer)       IndexError
    ├── SeedStateError                  the seed's state does not allow the call
    │   └── IllegalTransitionError      a lifecycle edge that does not exist
    ├── AlphaError                                                                    ValueError
    │   ├── AlphaRangeError             α outside [0, 1]
    │   └── LerpBudgetError             Σ α of lerp seeds would exceed 1
    ├── BlueprintError
    │   ├── BlueprintSpecError          the spec itself is invalid                    ValueError
    │   ├── UnknownBlueprintError       no blueprint of that name                     LookupError
    │   └── BlueprintHostError          the blueprint cannot serve this host
    ├── CompileError                    instantiate / export / validate failed
    ├── KernelError
    │   ├── UnknownKernelError          no kernel of that id or name                  LookupError
    │   ├── KernelFetchError            a cache tier failed to deliver
    │   │   └── KernelUnreachableError  …because what holds it could not be reached: retry
    │   ├── KernelMismatchError         the kernel's output does not fit the host
    │   │   ├── KernelShapeError
    │   │   └── KernelDtypeError
    │   └── ArtifactError               the artifact bytes cannot be trusted or read
    │       ├── CorruptArtifactError
    │       ├── DigestMismatchError
    │       ├── SignatureMismatchError
    │       ├── UnsafeKernelError       its program calls an operator off the allow-list
    │       └── UntrustedKernelError    its format runs code at load, and nobody vouches for it
    ├── MessageError                    a bus message that cannot be handled as sent
    │   ├── MalformedMessageError       not JSON, or not an envelope
    │   ├── UnknownMessageTypeError     no contract of that type
    │   ├── UnsupportedVersionError     the type's schema version is not one we read
    │   └── MessageValidationError      the payload does not fit its contract         ValueError
    ├── BusError                        Redis could not be reached in time
    └── ServiceError                    a service answered an HTTP call with an error
        └── ServiceUnreachableError     no answer: refused, timed out or cut off

Every message names the thing it is about (layer, seed index, kernel id, blueprint, op).
"""

from __future__ import annotations


class EsperError(Exception):
    """Base of every error Esper raises on purpose."""


class ConfigError(EsperError, ValueError):
    """An argument has a value the call cannot accept."""


class UnknownLayerError(EsperError, LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        shown = ", ".join(known[:12]) + (" …" if len(known) > 12 else "")
        super().__init__(f"unknown layer {name!r}; wrapped layers: {shown or '(none)'}")
        self.name = name


class UnsupportedHostError(EsperError, TypeError):
    """Kasmina wraps nn.Linear and nn.Conv2d only."""


class SeedIndexError(EsperError, IndexError):
    def __init__(self, layer: str, index: int, num_seeds: int) -> None:
        super().__init__(
            f"seed index {index} is out of range for layer {layer!r}, "
            f"which has {num_seeds} seeds (0..{num_seeds - 1})"
        )


class SeedStateError(EsperError):
    """The seed is in a state that does not allow the call."""


class IllegalTransitionError(SeedStateError):
    pass


class AlphaError(EsperError, ValueError):
    pass


class AlphaRangeError(AlphaError):
    pass


class LerpBudgetError(AlphaError):
    pass


class BlueprintError(EsperError):
    pass


class BlueprintSpecError(BlueprintError, ValueError):
    pass


class UnknownBlueprintError(BlueprintError, LookupError):
    pass


class BlueprintHostError(BlueprintError):
    pass


class CompileError(EsperError):
    pass


class KernelError(EsperError):
    pass


class UnknownKernelError(KernelError, LookupError):
    pass


class KernelFetchError(KernelError):
    pass


class KernelUnreachableError(KernelFetchError):
    """No tier delivered the kernel, and at least one failed for want of an answer (Urza down or
    restarting, its circuit open): unlike a refused artifact, asking again later may work."""


class KernelMismatchError(KernelError):
    pass


class KernelShapeError(KernelMismatchError):
    pass


class KernelDtypeError(KernelMismatchError):
    pass


class ArtifactError(KernelError):
    pass


class CorruptArtifactError(ArtifactError):
    pass


class DigestMismatchError(ArtifactError):
    pass


class SignatureMismatchError(ArtifactError):
    pass


class UnsafeKernelError(ArtifactError):
    """The kernel's program calls an operator that is not tensor math (see
    esper.kernels.inspection); nothing of it ran."""


class UntrustedKernelError(ArtifactError):
    """The kernel's format runs code while it loads (TorchScript's `__setstate__`), which cannot
    be inspected first, and neither Urza nor the caller vouches for it."""


class MessageError(EsperError):
    """A bus message that cannot be handled as sent; the consumer dead-letters it with this."""


class MalformedMessageError(MessageError):
    pass


class UnknownMessageTypeError(MessageError):
    pass


class UnsupportedVersionError(MessageError):
    pass


class MessageValidationError(MessageError, ValueError):
    pass


class BusError(EsperError):
    """Redis could not be reached within the configured time."""


class ServiceError(EsperError):
    """A service answered with an error body: `status`, its `type` and `message` are kept, so a
    caller can tell an unknown name (404) from bad input (422) from an outage (5xx).
    `retry_after_s` is the answer's numeric Retry-After, when it had one."""

    def __init__(
        self,
        service: str,
        status: int,
        type: str,
        message: str,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{service}: {status} {type}: {message}")
        self.service = service
        self.status = status
        self.type = type
        self.message = message
        self.retry_after_s = retry_after_s


class ServiceUnreachableError(ServiceError):
    """No answer came (status 503, type `unreachable`): the service may be down or restarting,
    so unlike most errors this one is worth retrying."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(service, 503, "unreachable", message)


RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
"""Answers that say "not now" rather than "no": too many requests, and a gateway or the service
itself unavailable. A 500 is not among them: it is what a bug answers, the same way each time."""


def is_transient(err: BaseException) -> bool:
    """Whether `err` says the other side could not be reached or asked to come back later, so
    the same request may succeed when retried; everything else (an unknown name, bad input, a
    refused artifact, a bug) answers the same way next time."""
    if isinstance(err, KernelUnreachableError):
        return True
    if isinstance(err, ServiceError):
        return err.status in RETRYABLE_STATUSES
    return False

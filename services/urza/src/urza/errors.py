"""Urza's own errors: each names one way a request can fail, so the API answers each one the
same way on every route (api/errors.py). Each is a subclass of the library error it refines, so
code that catches the library's error still catches it."""

from __future__ import annotations

from esper.exceptions import (
    BlueprintError,
    ConfigError,
    CorruptArtifactError,
    KernelError,
    UnknownKernelError,
)


class UnknownTagError(UnknownKernelError):
    """No kernel has this tag (or not the kernel named with it)."""


class BlueprintConflictError(ConfigError):
    """This name and version is registered with other content, is built in, or is older than
    the latest version: the request must use another version."""


class KernelConflictError(ConfigError):
    """This kernel id is stored with other bytes; an id names exactly one artifact."""


class InvalidTagError(ConfigError):
    """Not a valid tag: bad characters, or it looks like a kernel id."""


class InvalidCursorError(ConfigError):
    """A listing cursor this Urza did not hand out."""


class InvalidBlueprintError(BlueprintError):
    """The blueprint failed its trial on a typical host of a kind it claims."""


class KernelBudgetError(BlueprintError):
    """The blueprint instantiated for this host would have more parameters, or need more memory
    to compile, than this Urza allows: refused before anything is allocated."""


class UploadBudgetError(KernelBudgetError):
    """An uploaded kernel holds more parameters, or would need more memory to load and probe,
    than this Urza allows: refused before it runs, and nothing is stored."""


class AdminTokenRequiredError(KernelError):
    """An upload in a format whose loading runs code that cannot be inspected first
    (TorchScript), without Urza's admin token."""


class CorruptBlobError(CorruptArtifactError):
    """A stored kernel's bytes are missing or no longer match their digest: damage on Urza's
    disk, not a bad upload."""

"""How Urza's API answers the errors its store and compiler raise, on every route alike."""

from __future__ import annotations

from esper.exceptions import (
    ArtifactError,
    BlueprintHostError,
    CompileError,
    KernelMismatchError,
    UnknownBlueprintError,
    UnknownKernelError,
    UnsafeKernelError,
)
from esper.service import ErrorMapping, ErrorTable, path_param
from urza.compiler import QueueFullError
from urza.errors import (
    AdminTokenRequiredError,
    BlueprintConflictError,
    CorruptBlobError,
    InvalidBlueprintError,
    InvalidCursorError,
    InvalidTagError,
    KernelBudgetError,
    KernelConflictError,
    UnknownTagError,
    UploadBudgetError,
)

_BAD_ARTIFACT = ErrorMapping(422, "invalid_artifact", ["body", "artifact"])

ERRORS: ErrorTable = {
    # A kernel is named by id on most routes and by id or tag on `GET /kernels/{ref}`.
    UnknownKernelError: ErrorMapping(404, "unknown_kernel", path_param("kernel_id", "ref")),
    UnknownTagError: ErrorMapping(404, "unknown_tag", ["path", "tag"]),
    UnknownBlueprintError: ErrorMapping(
        404, "unknown_blueprint", path_param("name", otherwise=["body", "blueprint"])
    ),
    InvalidBlueprintError: ErrorMapping(422, "invalid_blueprint", ["body"]),
    BlueprintHostError: ErrorMapping(422, "blueprint_host_mismatch", ["body", "host"]),
    KernelBudgetError: ErrorMapping(422, "over_budget", ["body", "host"]),
    UploadBudgetError: ErrorMapping(422, "over_budget", ["body", "artifact"]),
    CompileError: ErrorMapping(422, "compile_failed", ["body", "blueprint"]),
    BlueprintConflictError: ErrorMapping(409, "conflict", ["body", "version"]),
    KernelConflictError: ErrorMapping(409, "conflict", ["body", "artifact"]),
    ArtifactError: _BAD_ARTIFACT,
    # A kernel whose program does more than tensor math: the message names the operator.
    UnsafeKernelError: ErrorMapping(422, "unsafe_kernel", ["body", "artifact"]),
    AdminTokenRequiredError: ErrorMapping(403, "admin_token_required", ["body", "meta", "format"]),
    KernelMismatchError: _BAD_ARTIFACT,
    # Damage on Urza's own disk is Urza's failure, unlike bad bytes a client uploaded.
    CorruptBlobError: ErrorMapping(500, "corrupt_artifact", ["path", "kernel_id"]),
    InvalidCursorError: ErrorMapping(422, "validation_error", ["query", "cursor"]),
    InvalidTagError: ErrorMapping(
        422, "validation_error", path_param("tag", otherwise=["body", "tags"])
    ),
    QueueFullError: ErrorMapping(429, "too_many_requests", headers={"Retry-After": "1"}),
}

"""`POST /jobs` with the user's code: the multipart upload (`spec` and a `code` zip), the
`allow_user_code` policy, the check of the entrypoints in a child process under a time limit,
and keeping the zip, content-addressed, once every check has passed. A refused job leaves
nothing behind: the zip is unpacked for its check into a temporary directory only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from esper.contracts import JobSpec
from esper.files import atomic_write
from esper.service import ApiError
from tolaria.errors import SpecError
from tolaria.settings import TolariaSettings
from tolaria.usercode import (
    CodeArchiveError,
    ZipLimits,
    answer_of,
    check_zip,
    digest_of,
    directory_under,
    unpack,
    zip_path,
)

SECRET_PREFIXES = ("TOLARIA_", "URZA_", "TAMIYO_", "NISSA_", "ESPER_")
"""Variables the check child does not get: the services' tokens, keys and bus."""
MULTIPART_OVERHEAD = 64 << 10
"""Boundaries and part headers of a multipart body, beyond its spec and zip."""


@dataclass(frozen=True, eq=False)
class CodeUpload:
    data: bytes
    digest: str


def body_limit(settings: TolariaSettings) -> int:
    """The largest `POST /jobs` body: a spec, and where user code is allowed a zip with it."""
    extra = settings.max_code_bytes + MULTIPART_OVERHEAD if settings.user_code_allowed else 0
    return settings.max_spec_bytes + extra


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def refuse_unless_allowed(settings: TolariaSettings) -> None:
    if not settings.user_code_allowed:
        raise ApiError(
            403,
            "user_code_disabled",
            "this Tolaria does not run user code (a `python` model or dataset, uploaded code); "
            "its operator can allow it with TOLARIA_ALLOW_USER_CODE=true (or with_token, with "
            "an API token set)",
            ["body", "code"],
        )


async def read_multipart(
    request: Request, settings: TolariaSettings
) -> tuple[bytes, CodeUpload | None]:
    """The `spec` part (JSON or YAML text) and the `code` zip, checked (413 / 422)."""
    refuse_unless_allowed(settings)
    try:
        form = await request.form(max_files=2, max_fields=2, max_part_size=settings.max_spec_bytes)
    except Exception as err:  # python-multipart's and Starlette's parse errors
        message = f"body is not valid multipart: {err}"
        raise ApiError(422, "validation_error", message, ["body"]) from None
    try:
        spec = await _part(form.get("spec"), "spec", settings.max_spec_bytes)
        if spec is None:
            raise ApiError(422, "validation_error", "the body has no `spec` part", ["body", "spec"])
        code = await _part(form.get("code"), "code", settings.max_code_bytes)
    finally:
        await form.close()
    if code is None:
        return spec, None
    try:
        await asyncio.to_thread(check_zip, code, ZipLimits.of(settings))
    except CodeArchiveError as err:
        status, kind = (413, "payload_too_large") if err.too_large else (422, "invalid_code")
        raise ApiError(status, kind, str(err), ["body", "code"]) from None
    return spec, CodeUpload(code, digest_of(code))


async def _part(value: UploadFile | str | None, name: str, limit: int) -> bytes | None:
    if value is None:
        return None
    data = value.encode() if isinstance(value, str) else await value.read(limit + 1)
    if len(data) > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the `{name}` part is over the limit of {limit} bytes",
            ["body", name],
            limit_bytes=limit,
        )
    return data


def with_code_digest(document: Any, upload: CodeUpload) -> Any:
    """The spec document with `code: {digest}` of the upload (what a client leaves out)."""
    if not isinstance(document, dict):
        return document
    code = document.get("code")
    if code is not None and code != {"digest": upload.digest}:
        raise ApiError(
            422,
            "validation_error",
            f"the spec names its own code ({code}) and a zip came with it: send one or the other",
            ["body", "code"],
        )
    return {**document, "code": {"digest": upload.digest}}


async def check_code(spec: JobSpec, upload: CodeUpload | None, settings: TolariaSettings) -> None:
    """Check a spec that runs user code in a child process (raises SpecError, ApiError)."""
    code = spec.code
    assert code is not None
    refuse_unless_allowed(settings)
    with tempfile.TemporaryDirectory(prefix="tolaria-check-") as scratch:
        root = Path(scratch)
        if code.path is not None:
            code_dir = directory_under(settings.data_dir, code.path)
        else:
            data = upload.data if upload is not None else _stored(settings, code.digest)
            code_dir = root / "code"
            await asyncio.to_thread(unpack, data, code_dir, ZipLimits.of(settings))
        await asyncio.to_thread(check_in_child, spec, code_dir, settings, root)


def _stored(settings: TolariaSettings, digest: str | None) -> bytes:
    assert digest is not None
    path = zip_path(settings.work_dir, digest)
    if not path.is_file():
        raise SpecError(
            ["spec", "code", "digest"],
            f"no code with digest {digest} was uploaded here: send the zip with the job",
        )
    return path.read_bytes()


def check_in_child(spec: JobSpec, code_dir: Path, settings: TolariaSettings, scratch: Path) -> None:
    """`python -m tolaria.usercode check` in its own session, killed with everything it
    started past `user_code_check_s`; raises the SpecError it reports."""
    request, progress, output = scratch / "request.json", scratch / "progress.jsonl", "out.log"
    request.write_text(
        json.dumps(
            {
                "spec": spec.model_dump(mode="json"),
                "code_dir": str(code_dir),
                "data_dir": str(settings.data_dir.resolve()),
                "max_memory_bytes": settings.max_job_memory_bytes,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(SECRET_PREFIXES)}
    env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tolaria.usercode", "check", str(request), str(progress)]
    with (scratch / output).open("wb") as log:
        child = subprocess.Popen(
            command,
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        exit_code: int | None
        try:
            exit_code = child.wait(timeout=settings.user_code_check_s)
        except subprocess.TimeoutExpired:
            exit_code = None
        # The whole session: whatever the user's code started goes with it.
        with contextlib.suppress(OSError):  # none left
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    lines = progress.read_text().splitlines() if progress.exists() else []
    said = (scratch / output).read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
    refusal = answer_of(lines, settings.user_code_check_s, exit_code, said[-1:])
    if refusal is not None:
        raise refusal


def keep(upload: CodeUpload, settings: TolariaSettings) -> None:
    """Store the zip by its digest: once, atomically, after every check passed."""
    path = zip_path(settings.work_dir, upload.digest)
    if not path.exists():
        atomic_write(path, upload.data)

"""Kernels: compile one from a blueprint, upload a trained one, find them, fetch their bytes,
and name them with tags."""

from __future__ import annotations

import asyncio
import base64
import hmac
from typing import Annotated

from fastapi import (
    APIRouter,
    File,
    Form,
    Header,
    Path,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from pydantic import ValidationError

from esper.contracts import (
    KERNEL_ID_RE,
    CompileRequest,
    HostSignature,
    KernelMeta,
    KernelResult,
    KernelUpload,
    Page,
    Tag,
)
from esper.service import ApiError, RequireToken, error_responses
from urza.deps import CompilerDep, SettingsDep, StoreDep
from urza.errors import UnknownTagError
from urza.settings import UrzaSettings

router = APIRouter(prefix="/kernels", tags=["kernels"])

_ERRORS = error_responses(404, 409, 413, 422)
KernelIdPath = Annotated[str, Path(pattern=KERNEL_ID_RE.pattern, description="krn_ + 24 hex")]


def _check_width(host: HostSignature, limit: int, where: list[str | int]) -> None:
    widest = max(host.in_features, host.seed_out_features, host.out_features)
    if widest > limit:
        raise ApiError(
            422,
            "validation_error",
            f"host width {widest} is over this Urza's limit of {limit}",
            where,
        )


def _is_admin(settings: UrzaSettings, given: str | None) -> bool:
    """No header: not an admin. A header that does not match: refused (403), not ignored, so a
    caller learns that the token it holds is wrong."""
    if given is None:
        return False
    expected = settings.admin_token_value
    # compare_digest: the time taken must not reveal how much of the token matched.
    if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            403,
            "forbidden",
            "the admin token is not valid for this Urza",
            ["header", "x-esper-admin-token"],
        )
    return True


def _created(result: KernelResult, response: Response) -> KernelResult:
    response.status_code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
    return result


@router.post(
    "/compile",
    response_model=KernelResult,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RequireToken],
    responses={200: {"model": KernelResult}, **_ERRORS, **error_responses(429)},
)
async def compile_kernel(
    request: CompileRequest, compiler: CompilerDep, settings: SettingsDep, response: Response
) -> KernelResult:
    """Compile a registered blueprint for a host (201), or return the kernel the same input
    compiled before (200) without compiling again."""
    _check_width(request.host, settings.max_features, ["body", "host"])
    return _created(await compiler.compile(request), response)


@router.post(
    "",
    response_model=KernelResult,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RequireToken],
    responses={200: {"model": KernelResult}, **_ERRORS},
)
async def upload_kernel(
    compiler: CompilerDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    meta: Annotated[str, Form(description="KernelUpload as JSON")],
    artifact: Annotated[UploadFile, File(description="the kernel's bytes")],
    admin_token: Annotated[
        str | None,
        Header(
            alias="X-Esper-Admin-Token",
            description="URZA_ADMIN_TOKEN: needed to upload TorchScript (its load runs code)",
        ),
    ] = None,
) -> KernelResult:
    """Upload a trained kernel with its lineage. Its program is inspected before any of it runs
    (only tensor-math operators: else 422 `unsafe_kernel`, naming the operator); TorchScript
    needs the admin token (else 403 `admin_token_required`); a kernel over the parameter or
    memory budget is 422 `over_budget`, naming both numbers. The bytes must load and fit the
    host named in `meta`; the kernel is stored (201) or found already stored (200)."""
    admin = _is_admin(settings, admin_token)
    try:
        upload = KernelUpload.model_validate_json(meta)
    except ValidationError as err:
        first = err.errors()[0]
        where: list[str | int] = ["body", "meta", *first["loc"]]
        message = f"{'.'.join(map(str, where))}: {first['msg']}"
        raise ApiError(422, "validation_error", message, where) from None
    _check_width(upload.host, settings.max_features, ["body", "meta", "host"])
    parent = upload.lineage.parent_kernel_id
    if parent is not None and not await asyncio.to_thread(store.has_kernel, parent):
        raise ApiError(
            422,
            "unknown_kernel",
            f"lineage names parent kernel {parent}, which Urza does not have",
            ["body", "meta", "lineage", "parent_kernel_id"],
        )
    data = await artifact.read()
    return _created(await compiler.upload(upload, data, admin=admin), response)


@router.get("", response_model=Page[KernelMeta], responses=_ERRORS)
async def list_kernels(
    store: StoreDep,
    blueprint: str | None = None,
    name: str | None = None,
    tag: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    cursor: str | None = Query(default=None, max_length=512),
) -> Page[KernelMeta]:
    """Kernels newest first; pass `next_cursor` back as `cursor` for the next page."""
    items, next_cursor = await asyncio.to_thread(
        store.list_kernels, blueprint=blueprint, name=name, tag=tag, limit=limit, cursor=cursor
    )
    return Page[KernelMeta](items=items, next_cursor=next_cursor)


@router.get("/{ref}", response_model=KernelMeta, responses=_ERRORS)
async def get_kernel(
    store: StoreDep, ref: Annotated[str, Path(max_length=128, description="kernel id or tag")]
) -> KernelMeta:
    return await asyncio.to_thread(store.get_kernel, ref)


@router.get(
    "/{kernel_id}/artifact",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {}, **_ERRORS},
)
async def get_artifact(kernel_id: KernelIdPath, store: StoreDep, request: Request) -> Response:
    """The kernel's bytes. `ETag` is the sha256; `X-Esper-Digest` and `X-Esper-Signature` let a
    cache verify them, `X-Esper-Kernel-Meta` (base64url JSON) saves it a metadata round trip."""
    # Read and verified before any 304: a client revalidating a cached copy must learn that the
    # store's blob is corrupt, as a GET would, not be told its copy is still good.
    artifact = await asyncio.to_thread(store.read_artifact, kernel_id)
    meta = artifact.meta
    etag = f'"{meta.digest.removeprefix("sha256:")}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "public, max-age=31536000, immutable",  # bytes of an id never change
        "X-Esper-Digest": meta.digest,
        "X-Esper-Kernel-Meta": base64.urlsafe_b64encode(meta.model_dump_json().encode()).decode(),
    }
    if meta.hmac_sha256:
        headers["X-Esper-Signature"] = meta.hmac_sha256
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(artifact.data, media_type="application/octet-stream", headers=headers)


@router.put(
    "/{kernel_id}/tags/{tag}",
    response_model=KernelMeta,
    dependencies=[RequireToken],
    responses=_ERRORS,
)
async def tag_kernel(
    kernel_id: KernelIdPath, tag: Annotated[Tag, Path()], store: StoreDep
) -> KernelMeta:
    """Point `tag` at this kernel (moving it if it named another); the kernel resolves by it."""
    if KERNEL_ID_RE.fullmatch(tag):
        raise ApiError(
            422, "validation_error", "a tag must not look like a kernel id", ["path", "tag"]
        )
    await asyncio.to_thread(store.set_tag, tag, kernel_id)
    return await asyncio.to_thread(store.get_kernel, kernel_id)


@router.delete(
    "/{kernel_id}/tags/{tag}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[RequireToken],
    responses=_ERRORS,
)
async def untag_kernel(
    kernel_id: KernelIdPath, tag: Annotated[Tag, Path()], store: StoreDep
) -> None:
    def remove() -> None:
        if tag not in store.tags_of(kernel_id):
            raise UnknownTagError(f"kernel {kernel_id} has no tag {tag!r}")
        store.delete_tag(tag)

    await asyncio.to_thread(remove)


@router.get("/{kernel_id}/tags", response_model=list[str], responses=_ERRORS)
async def kernel_tags(kernel_id: KernelIdPath, store: StoreDep) -> list[str]:
    await asyncio.to_thread(store.get_kernel, kernel_id)
    return await asyncio.to_thread(store.tags_of, kernel_id)

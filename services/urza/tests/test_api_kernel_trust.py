"""Urza's side of the kernel trust model (README, "Kernel trust"): an upload's program is
inspected before any of it runs and only tensor-math operators pass; TorchScript, whose loading
runs code first, is taken only from an uploader holding URZA_ADMIN_TOKEN; and a job loads what
Urza vouches for.

Hostile kernels (esper.testing.hostile_kernels) touch only a marker in the test's temp directory,
which Urza, a process on this machine, would write if a check let one through: a broken check
fails these tests and harms nothing. Every refusal is checked to have stored nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from esper.contracts import KernelMeta, KernelResult, Page
from esper.contracts.api import ErrorBody, ErrorInfo
from esper.kernels import tiered_cache
from esper.kernels.artifact import sign
from esper.testing import ServiceProcess
from esper.testing import hostile_kernels as hostile
from urza.settings import UrzaSettings

ADMIN = "urza-test-admin-token"
HOST = {"kind": "linear", "in_features": hostile.WIDTH, "out_features": hostile.WIDTH}


@pytest.fixture(scope="module")
def trust_urza(urza_module_factory: Callable[..., ServiceProcess]) -> ServiceProcess:
    return urza_module_factory(URZA_ADMIN_TOKEN=ADMIN)


@pytest.fixture
def client(trust_urza: ServiceProcess, client_factory: Callable[..., httpx.Client]) -> httpx.Client:
    return client_factory(trust_urza)


@pytest.fixture(scope="module", autouse=True)
def _nap_registered() -> None:
    hostile.register_nap()  # here, to script and export kernels calling it; Urza never has it


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """The directory hostile kernels point at; it must hold nothing new afterwards."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"abcd")
    yield tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def target(work: Path, case: str) -> str:
    return str(work / "secret") if case == "reads_a_file" else str(work / f"marker-{case}")


def upload(
    client: httpx.Client, fmt: str, data: bytes, name: str, admin: str | None = None
) -> httpx.Response:
    meta = {"name": name, "format": fmt, "host": HOST}
    headers = {"X-Esper-Admin-Token": admin} if admin is not None else {}
    files = {"artifact": ("kernel.bin", data, "application/octet-stream")}
    return client.post("/kernels", data={"meta": json.dumps(meta)}, files=files, headers=headers)


def refused(resp: httpx.Response, status: int, type_: str) -> ErrorInfo:
    assert resp.status_code == status, resp.text
    info = ErrorBody.model_validate(resp.json()).error
    assert info.type == type_, info
    return info


def stored(client: httpx.Client) -> list[str]:
    page = Page[KernelMeta].model_validate(client.get("/kernels", params={"limit": 1000}).json())
    return [meta.kernel_id for meta in page.items]


# --------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("case", list(hostile.EXPORT_KERNELS))
def test_hostile_export_upload_is_refused_naming_the_operator(
    client: httpx.Client, work: Path, case: str
) -> None:
    make, operator = hostile.EXPORT_KERNELS[case]
    before = stored(client)
    for admin in (None, ADMIN):  # the admin token does not let an operator through
        resp = upload(client, "export", make(target(work, case)), f"hostile_{case}", admin)
        info = refused(resp, 422, "unsafe_kernel")
        assert info.location == ["body", "artifact"]
        assert f"calls operator {operator}" in info.message
    assert stored(client) == before


# ---------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("case", list(hostile.TORCHSCRIPT_KERNELS))
def test_hostile_torchscript_upload_is_refused(client: httpx.Client, work: Path, case: str) -> None:
    """Without the admin token TorchScript is refused unloaded (403); with it, it is loaded
    (its __setstate__ is the admin's word) and refused by inspection before its forward runs."""
    make, operator = hostile.TORCHSCRIPT_KERNELS[case]
    data = hostile.torchscript_bytes(make(target(work, case)))
    before = stored(client)
    info = refused(upload(client, "torchscript", data, f"ts_{case}"), 403, "admin_token_required")
    assert "admin token" in info.message and "X-Esper-Admin-Token" in info.message
    resp = upload(client, "torchscript", data, f"ts_{case}", admin=ADMIN)
    # Urza has no such custom operator: TorchScript cannot even compile the call, and says so.
    info = refused(resp, 422, "invalid_artifact" if case == "custom_op" else "unsafe_kernel")
    assert operator in info.message
    assert stored(client) == before


def test_a_wrong_admin_token_is_refused(client: httpx.Client) -> None:
    data = hostile.torchscript_bytes(hostile.Prints())
    before = stored(client)
    info = refused(
        upload(client, "torchscript", data, "wrong_admin", admin="guess"), 403, "forbidden"
    )
    assert info.location == ["header", "x-esper-admin-token"]
    assert stored(client) == before


def test_an_urza_without_an_admin_token_takes_no_torchscript_upload(
    urza_factory: Callable[..., ServiceProcess], client_factory: Callable[..., httpx.Client]
) -> None:
    """An Urza whose URZA_ADMIN_TOKEN is empty: nobody may upload TorchScript to it."""
    api = client_factory(urza_factory(URZA_ADMIN_TOKEN=""))
    compiled = api.post(
        "/kernels/compile", json={"blueprint": "low_rank", "host": HOST, "format": "torchscript"}
    )
    kernel = KernelResult.model_validate(compiled.json()).kernel
    data = api.get(f"/kernels/{kernel.kernel_id}/artifact").content
    refused(upload(api, "torchscript", data, "no_admin_here"), 403, "admin_token_required")
    refused(upload(api, "torchscript", data, "no_admin_here", admin=ADMIN), 403, "forbidden")


# ------------------------------------------------------------------- what Urza vouches for
def test_vouching_travels_signed_to_the_job(
    client: httpx.Client, trust_urza: ServiceProcess, signing_key: bytes
) -> None:
    """Compiled kernels are vouched for by the compiler, an admin's TorchScript upload by the
    admin, a plain export upload by nobody; the signature covers it, and a job's cache loads the
    vouched TorchScript from Urza without trusting TorchScript in general."""
    resp = client.post(
        "/kernels/compile", json={"blueprint": "low_rank", "host": HOST, "format": "torchscript"}
    )
    compiled = KernelResult.model_validate(resp.json()).kernel
    assert compiled.vouched_by == "compiler"
    data = client.get(f"/kernels/{compiled.kernel_id}/artifact").content

    resp = upload(client, "torchscript", data, "admin_upload", admin=ADMIN)
    assert resp.status_code == 201, resp.text
    uploaded = KernelResult.model_validate(resp.json()).kernel
    assert uploaded.vouched_by == "admin"
    assert uploaded.hmac_sha256 == sign(uploaded, signing_key)
    forged = uploaded.model_copy(update={"vouched_by": None})
    assert sign(forged, signing_key) != uploaded.hmac_sha256

    resp = client.post(
        "/kernels/compile", json={"blueprint": "low_rank", "host": HOST, "format": "export"}
    )
    exported = KernelResult.model_validate(resp.json()).kernel
    export_data = client.get(f"/kernels/{exported.kernel_id}/artifact").content
    resp = upload(client, "export", export_data, "plain_upload")
    assert resp.status_code == 201, resp.text
    assert KernelResult.model_validate(resp.json()).kernel.vouched_by is None

    cache = tiered_cache(urza_url=trust_urza.url, signing_key=signing_key)
    for kernel_id in (compiled.kernel_id, uploaded.kernel_id, exported.kernel_id):
        assert cache.get_sync(kernel_id).meta.kernel_id == kernel_id


def test_the_admin_token_must_differ_from_the_api_token() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        UrzaSettings(api_token="same", admin_token="same")
    settings = UrzaSettings(api_token="one", admin_token="")
    assert settings.admin_token_value is None

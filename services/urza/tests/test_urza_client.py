"""UrzaClient, the one client of Urza, against a real Urza process: each call it makes, and what
Urza's error answers become (ServiceErrors with Urza's status and type)."""

from __future__ import annotations

import pytest
from torch import nn

from esper.client import UrzaClient
from esper.contracts import HostSignature, KernelLineage, KernelUpload
from esper.exceptions import ServiceError
from esper.kernels.artifact import digest_of, verify
from esper.testing import ServiceProcess

HOST = HostSignature.of(nn.Linear(12, 12))


async def test_a_compiled_kernel_is_found_by_id_and_tag_and_its_artifact_verifies(
    urza: ServiceProcess, token: str, signing_key: bytes
) -> None:
    async with UrzaClient(urza.url, token=token) as client:
        result = await client.compile("low_rank", HOST, tags=["client_v1"])
        meta = result.kernel
        assert meta.blueprint == "low_rank" and "client_v1" in result.tags
        assert await client.kernel(meta.kernel_id) == meta
        assert await client.kernel("client_v1") == meta
        assert await client.kernel_for("low_rank", HOST, "export") == meta.kernel_id

        download = await client.download(meta.kernel_id)
        assert download.meta == meta
        assert download.digest == meta.digest
        assert download.signature is not None and download.signature == meta.hmac_sha256
        artifact = await client.artifact(meta.kernel_id)
        assert artifact.meta == meta and artifact.data == download.data
        verify(artifact, signing_key)


async def test_a_trained_kernel_is_uploaded_with_its_lineage(
    urza: ServiceProcess, token: str
) -> None:
    async with UrzaClient(urza.url, token=token) as client:
        parent = (await client.compile("low_rank", HOST)).kernel
        data = (await client.artifact(parent.kernel_id)).data
        upload = KernelUpload(
            name="client_trained",
            format=parent.format,
            host=parent.host,
            blueprint=parent.blueprint,
            digest=digest_of(data),
            lineage=KernelLineage(
                parent_kernel_id=parent.kernel_id, job_id="job-client", layer="fc", seed=0
            ),
        )
        result = await client.upload(upload, data)
        assert result.created and result.kernel.kernel_id != parent.kernel_id
        assert result.kernel.lineage["parent_kernel_id"] == parent.kernel_id
        assert await client.kernel(result.kernel.kernel_id) == result.kernel


async def test_blueprints_are_listed(urza: ServiceProcess) -> None:
    async with UrzaClient(urza.url) as client:
        items = await client.blueprints()
    names = {item["spec"]["name"] for item in items}
    assert {"low_rank", "wide_mlp"} <= names
    assert all(item["builtin"] for item in items if item["spec"]["name"] == "low_rank")


async def test_urzas_error_answers_keep_their_status_type_and_message(
    urza: ServiceProcess, token: str
) -> None:
    async with UrzaClient(urza.url, token=token) as client:
        with pytest.raises(ServiceError) as unknown_kernel:
            await client.kernel("krn_" + "0" * 24)
        with pytest.raises(ServiceError) as unknown_blueprint:
            await client.compile("no_such_blueprint", HOST)
    assert (unknown_kernel.value.status, unknown_kernel.value.type) == (404, "unknown_kernel")
    assert (unknown_blueprint.value.status, unknown_blueprint.value.type) == (
        404,
        "unknown_blueprint",
    )
    assert "no_such_blueprint" in unknown_blueprint.value.message
    assert str(unknown_blueprint.value).startswith("urza: 404 unknown_blueprint: ")

    async with UrzaClient(urza.url) as anonymous:
        with pytest.raises(ServiceError) as missing:
            await anonymous.compile("low_rank", HOST)
    async with UrzaClient(urza.url, token="not-the-token") as impostor:
        with pytest.raises(ServiceError) as wrong:
            await impostor.compile("low_rank", HOST)
    assert (missing.value.status, missing.value.type) == (401, "unauthorized")
    assert (wrong.value.status, wrong.value.type) == (403, "forbidden")

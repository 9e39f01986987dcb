"""Widening kernels through Urza's API: `widen` is a built-in, compiles for a widening host (a
HostSignature with `downstream`) and only for one, uploads for a widening host are probed with
both layers, the budget and the width limit count the widening host, and the blueprint listing
says which specs widen."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from esper.blueprints import BUILTIN_BLUEPRINTS, instantiate
from esper.contracts import HostSignature, KernelResult, Page
from esper.contracts.api import ErrorBody, ErrorInfo
from esper.kernels import KernelArtifact, deserialize
from esper.kernels.executor import KernelExecutor, example_input, export_program, save_program
from esper.testing import ServiceProcess
from urza.budget import estimate_compile
from urza.store import StoredBlueprint

LINEAR_A = {"kind": "linear", "in_features": 12, "out_features": 20}
LINEAR_B = {"kind": "linear", "in_features": 20, "out_features": 7}
CONV_A = {"kind": "conv2d", "in_features": 6, "out_features": 16, "kernel_size": [3, 3]}
CONV_B = {
    "kind": "conv2d",
    "in_features": 16,
    "out_features": 10,
    "kernel_size": [3, 3],
    "stride": [2, 2],
    "padding": [1, 1],
}


def widening(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {**a, "downstream": b}


def compile_kernel(
    client: httpx.Client, host: dict[str, Any], blueprint: str = "widen", fmt: str = "export"
) -> httpx.Response:
    return client.post(
        "/kernels/compile", json={"blueprint": blueprint, "host": host, "format": fmt}
    )


def compiled(client: httpx.Client, host: dict[str, Any], fmt: str = "export") -> KernelResult:
    resp = compile_kernel(client, host, fmt=fmt)
    assert resp.status_code in (200, 201), resp.text
    return KernelResult.model_validate(resp.json())


def error(resp: httpx.Response, status: int, type_: str) -> ErrorInfo:
    assert resp.status_code == status, resp.text
    info = ErrorBody.model_validate(resp.json()).error
    assert info.type == type_, info
    return info


def upload(client: httpx.Client, host: dict[str, Any], data: bytes) -> httpx.Response:
    meta = {"name": "trained_widen", "format": "export", "host": host, "blueprint": "widen"}
    files = {"artifact": ("kernel.bin", data, "application/octet-stream")}
    return client.post("/kernels", data={"meta": json.dumps(meta)}, files=files)


# ----------------------------------------------------------------------------- the listing
def test_widen_is_registered_and_every_listed_spec_says_whether_it_widens(
    anon: httpx.Client,
) -> None:
    resp = anon.get("/blueprints")
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert all(isinstance(item["spec"]["widens"], bool) for item in items)
    widens = {item["spec"]["name"]: item["spec"]["widens"] for item in items}
    assert widens["widen"] is True and widens["low_rank"] is False
    page = Page[StoredBlueprint].model_validate(resp.json())
    stored = next(b for b in page.items if b.spec.name == "widen")
    assert stored.builtin and stored.spec == BUILTIN_BLUEPRINTS["widen"]


def test_a_custom_widening_blueprint_registers(api: httpx.Client) -> None:
    spec = BUILTIN_BLUEPRINTS["widen"].model_dump(mode="json")
    spec.update(name="widen_gelu", description="widen with a gelu")
    spec["body"][1]["fn"] = "gelu"
    resp = api.post("/blueprints", json=spec)
    assert resp.status_code in (200, 201), resp.text
    assert StoredBlueprint.model_validate(resp.json()).spec.widens


# ------------------------------------------------------------------------------- compiling
@pytest.mark.parametrize(("a", "b"), [(LINEAR_A, LINEAR_B), (CONV_A, CONV_B)])
def test_widen_compiles_for_a_widening_host(
    api: httpx.Client, a: dict[str, Any], b: dict[str, Any]
) -> None:
    host = HostSignature.model_validate(widening(a, b))
    kernel = compiled(api, widening(a, b)).kernel
    assert kernel.blueprint == "widen"
    assert kernel.host == host and kernel.host.downstream == HostSignature.model_validate(b)
    assert kernel.params == sum(
        p.numel() for p in instantiate(BUILTIN_BLUEPRINTS["widen"], host).parameters()
    )

    data = api.get(f"/kernels/{kernel.kernel_id}/artifact").content
    assert host.downstream is not None
    first, second = host.layer.reference_module(), host.downstream.reference_module()
    module = KernelExecutor().prepare(
        deserialize(KernelArtifact(kernel, data)), first, kernel.kernel_id, downstream_layer=second
    )
    probe = example_input(host)
    with torch.no_grad():
        out = module(probe)
    assert tuple(out.shape) == host.output_shape(tuple(probe.shape))
    assert torch.count_nonzero(out) == 0


def test_widen_for_a_plain_host_is_refused_and_low_rank_takes_the_layer_alone(
    api: httpx.Client,
) -> None:
    info = error(compile_kernel(api, LINEAR_A), 422, "blueprint_host_mismatch")
    assert "widening host" in info.message
    # A job offers every layer that can be widened with its downstream layer: a plain
    # blueprint compiles for the layer alone, the same kernel as for the plain host.
    offered = compile_kernel(api, widening(LINEAR_A, LINEAR_B), "low_rank")
    alone = compile_kernel(api, LINEAR_A, "low_rank")
    assert offered.status_code in (200, 201) and alone.status_code in (200, 201), offered.text
    kernel = KernelResult.model_validate(offered.json()).kernel
    assert kernel.host.downstream is None
    assert kernel.kernel_id == KernelResult.model_validate(alone.json()).kernel.kernel_id


def test_the_width_limit_counts_the_downstream_layer(
    urza_factory: Callable[..., ServiceProcess], token: str
) -> None:
    small = urza_factory(URZA_MAX_FEATURES="64")
    wide_b = {**LINEAR_B, "out_features": 65}
    with httpx.Client(base_url=small.url, headers={"Authorization": f"Bearer {token}"}) as client:
        info = error(compile_kernel(client, widening(LINEAR_A, wide_b)), 422, "validation_error")
        assert "65" in info.message


# ---------------------------------------------------------------------------------- budget
def test_the_budget_estimate_counts_the_widening_host() -> None:
    spec = BUILTIN_BLUEPRINTS["widen"]
    host = HostSignature.model_validate(widening(CONV_A, CONV_B))
    estimate = estimate_compile(spec, host)
    module = instantiate(spec, host)
    assert estimate.parameters == sum(p.numel() for p in module.parameters())
    example = example_input(host)  # A's input, large enough for both layers
    with torch.no_grad():
        out = module(example)
    assert estimate.activation_bytes >= 4 * (example.numel() + out.numel())


def test_a_widening_compile_over_budget_is_refused(
    urza_factory: Callable[..., ServiceProcess], token: str
) -> None:
    small = urza_factory(URZA_MAX_KERNEL_PARAMS="100")
    with httpx.Client(
        base_url=small.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        info = error(compile_kernel(client, widening(LINEAR_A, LINEAR_B)), 422, "over_budget")
        assert "12→20→7" in info.message and "207 parameters" in info.message


# ---------------------------------------------------------------------------------- upload
def test_an_upload_for_a_widening_host_is_probed_with_both_layers(api: httpx.Client) -> None:
    host = widening(LINEAR_A, LINEAR_B)
    kernel = compiled(api, host).kernel
    data = api.get(f"/kernels/{kernel.kernel_id}/artifact").content
    resp = upload(api, host, data)
    assert resp.status_code in (200, 201), resp.text
    stored = KernelResult.model_validate(resp.json()).kernel
    assert stored.host.downstream == HostSignature.model_validate(LINEAR_B)
    assert stored.params == kernel.params

    # The same bytes declared for a next layer of another width do not give its output.
    other = widening(LINEAR_A, {**LINEAR_B, "out_features": 9})
    info = error(upload(api, other, data), 422, "invalid_artifact")
    assert "(3, 9)" in info.message


def test_an_upload_of_a_plain_kernel_for_a_widening_host_is_refused(api: httpx.Client) -> None:
    a = HostSignature.model_validate(LINEAR_A)
    data = save_program(export_program(nn.Linear(12, 20), a))  # fits A alone, not A then B
    info = error(upload(api, widening(LINEAR_A, LINEAR_B), data), 422, "invalid_artifact")
    assert "(3, 7)" in info.message

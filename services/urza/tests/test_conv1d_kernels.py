"""Conv1d hosts through Urza: kernels compile for them through the API (plain and widening), a
blueprint that serves conv1d is tried on a conv1d host when registered, the compile budget sizes
them, and a store holding the built-ins of before conv1d still starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.contracts import HostSignature, KernelResult
from esper.kernels import KernelArtifact, deserialize
from urza.budget import estimate_compile
from urza.store import KernelStore

CONV1D = {
    "kind": "conv1d",
    "in_features": 6,
    "out_features": 12,
    "kernel_size": [1, 5],
    "stride": [1, 2],
    "padding": [0, 2],
}
NEXT = {"kind": "conv1d", "in_features": 12, "out_features": 4, "kernel_size": [1, 3]}


def compile_kernel(client: httpx.Client, host: dict[str, Any], blueprint: str) -> KernelResult:
    body = {"blueprint": blueprint, "host": host, "format": "export"}
    resp = client.post("/kernels/compile", json=body)
    assert resp.status_code == 201, resp.text
    return KernelResult.model_validate(resp.json())


def test_a_blueprint_compiles_for_a_conv1d_host_and_runs_on_sequences(
    api: httpx.Client,
) -> None:
    result = compile_kernel(api, CONV1D, "conv3x3")
    meta = result.kernel
    assert meta.host.kind == "conv1d" and meta.host == HostSignature.model_validate(CONV1D)
    assert meta.blueprint_version == BUILTIN_BLUEPRINTS["conv3x3"].version
    data = api.get(f"/kernels/{meta.kernel_id}/artifact").content
    module = deserialize(KernelArtifact(meta, data))
    host = nn.Conv1d(6, 12, 5, stride=2, padding=2)
    for length in (9, 30):
        x = torch.randn(3, 6, length)
        with torch.no_grad():
            out = module(x)
        assert out.shape == host(x).shape
        assert torch.count_nonzero(out) == 0
    listed = api.get("/kernels", params={"name": "conv3x3"}).json()["items"]
    assert meta.kernel_id in {item["kernel_id"] for item in listed}


def test_a_widening_kernel_compiles_for_two_conv1d_layers(api: httpx.Client) -> None:
    meta = compile_kernel(api, {**CONV1D, "downstream": NEXT}, "widen").kernel
    assert meta.host.kind == "conv1d"
    assert meta.host.downstream == HostSignature.model_validate(NEXT)


def test_a_conv1d_host_with_a_height_is_refused(api: httpx.Client) -> None:
    body = {"blueprint": "low_rank", "host": {**CONV1D, "kernel_size": [3, 3]}}
    resp = api.post("/kernels/compile", json=body)
    assert resp.status_code == 422, resp.text
    assert "conv1d host" in resp.text


def test_a_conv1d_blueprint_is_tried_on_a_conv1d_host(api: httpx.Client) -> None:
    spec = {
        "name": "seq_branch",
        "hosts": ["conv1d"],
        "body": [
            {"op": "host_proj", "out": "out", "bias": False},
            {"op": "conv", "out": "out", "kernel": 7},
            {"op": "squeeze_excite"},
            {"op": "project", "out": "out"},
        ],
    }
    resp = api.post("/blueprints", json=spec)
    assert resp.status_code == 201, resp.text
    assert compile_kernel(api, CONV1D, "seq_branch").kernel.host.kind == "conv1d"
    two_wide = {**spec, "name": "seq_misfit", "body": [{"op": "project", "out": "out"}]}
    refused = api.post("/blueprints", json=two_wide)
    assert refused.status_code == 422, refused.text
    assert "exactly one top-level op with the host's geometry" in refused.text


def test_the_budget_sizes_a_conv1d_compile() -> None:
    host = HostSignature.model_validate(CONV1D)
    estimate = estimate_compile(BUILTIN_BLUEPRINTS["residual_mlp"], host)
    assert estimate.parameters > 0 and estimate.activation_bytes > 0
    linear = HostSignature(kind="linear", in_features=6, out_features=12)
    # The same channels over a sequence hold more activations than one vector per sample.
    assert (
        estimate.activation_bytes
        > estimate_compile(BUILTIN_BLUEPRINTS["residual_mlp"], linear).activation_bytes
    )


def test_a_store_of_the_builtins_before_conv1d_still_takes_todays(tmp_path: Path) -> None:
    """Version 1 of the built-ins served linear and conv2d; today's serve conv1d too under a
    new version, so a store holding version 1 accepts them at start-up (not a conflict)."""
    with KernelStore(tmp_path / "urza") as store:
        for spec in BUILTIN_BLUEPRINTS.values():
            if "conv1d" in spec.hosts and spec.version > 1:
                old = [kind for kind in spec.hosts if kind != "conv1d"]
                store.put_blueprint(
                    spec.model_copy(update={"version": 1, "hosts": old}), builtin=True
                )
        for spec in BUILTIN_BLUEPRINTS.values():
            store.put_blueprint(spec, builtin=True)
        latest = store.get_blueprint("low_rank")
        assert "conv1d" in latest.spec.hosts and latest.builtin
        assert store.get_blueprint("low_rank", 1).spec.hosts == ["linear", "conv2d"]

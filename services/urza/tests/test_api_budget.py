"""Memory is bounded before a compile starts: a kernel whose parameters or compile memory
(estimated from sizes, nothing allocated) are over Urza's budget is refused with 422 naming the
estimate and the budget, and absurd host geometry or blueprint kernels are 422, never 500."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.blueprints.builder import instantiate
from esper.contracts import HostSignature
from esper.contracts.api import ErrorBody, ErrorInfo
from esper.kernels.executor import example_input
from esper.testing import ServiceProcess
from urza.budget import estimate_compile

CONV = {"kind": "conv2d", "in_features": 8, "out_features": 8, "kernel_size": [3, 3]}


def _error(resp: httpx.Response, status: int, type_: str) -> ErrorInfo:
    assert resp.status_code == status, resp.text
    info = ErrorBody.model_validate(resp.json()).error
    assert info.type == type_, info
    return info


def _kernels(api: httpx.Client) -> list[str]:
    return [k["kernel_id"] for k in api.get("/kernels", params={"limit": 1000}).json()["items"]]


def _compile(api: httpx.Client, host: dict[str, Any], blueprint: str) -> httpx.Response:
    return api.post("/kernels/compile", json={"blueprint": blueprint, "host": host})


def test_a_kernel_with_too_many_parameters_is_refused_before_compiling(api: httpx.Client) -> None:
    """wide_mlp on a 16384-wide host has a billion parameters (about 8 GiB to compile)."""
    before = _kernels(api)
    host = {"kind": "linear", "in_features": 16384, "out_features": 16384}
    info = _error(_compile(api, host, "wide_mlp"), 422, "over_budget")
    assert info.location == ["body", "host"]
    assert "1,073," in info.message and f"{1 << 28:,}" in info.message, info.message
    assert "URZA_MAX_KERNEL_PARAMS" in info.message
    assert _kernels(api) == before


def test_a_compile_over_the_memory_budget_is_refused(api: httpx.Client) -> None:
    """Few weights, but the example input of a dilated 63×63 kernel is gigabytes."""
    host = {**CONV, "in_features": 32, "kernel_size": [63, 63], "dilation": [64, 64]}
    info = _error(_compile(api, host, "low_rank"), 422, "over_budget")
    assert f"{4 << 30:,} bytes" in info.message, info.message
    assert "URZA_MAX_KERNEL_MEMORY_BYTES" in info.message


@pytest.mark.parametrize(
    "change",
    [
        {"dilation": [10_000_000, 10_000_000]},
        {"kernel_size": [100_000, 3]},
        {"stride": [1, 1 << 20]},
        {"padding": [1 << 20, 0]},
        {"in_features": 1 << 40, "out_features": 8},
    ],
    ids=["dilation", "kernel_size", "stride", "padding", "features"],
)
def test_absurd_host_geometry_is_422(api: httpx.Client, change: dict[str, Any]) -> None:
    info = _error(_compile(api, {**CONV, **change}, "low_rank"), 422, "validation_error")
    assert info.location[:2] == ["body", "host"], info


def test_an_absurd_blueprint_kernel_is_422(api: httpx.Client) -> None:
    spec = {
        "name": "huge_kernel",
        "hosts": ["conv2d"],
        "body": [
            {"op": "conv", "out": "out", "kernel": "host"},
            {"op": "conv", "out": "out", "kernel": 10001},
        ],
    }
    info = _error(api.post("/blueprints", json=spec), 422, "validation_error")
    assert "≤ 31" in info.message, info.message
    assert api.get("/blueprints/huge_kernel").status_code == 404


def test_the_budget_is_a_setting(urza_factory: Callable[..., ServiceProcess], token: str) -> None:
    small = urza_factory(URZA_MAX_KERNEL_PARAMS="1000")
    host = {"kind": "linear", "in_features": 64, "out_features": 64}
    with httpx.Client(
        base_url=small.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        info = _error(_compile(client, host, "low_rank"), 422, "over_budget")
        assert "1,000 (URZA_MAX_KERNEL_PARAMS)" in info.message
        tiny = {"kind": "linear", "in_features": 4, "out_features": 4}
        assert _compile(client, tiny, "low_rank").status_code == 201


@pytest.mark.parametrize("name", sorted(BUILTIN_BLUEPRINTS))
def test_the_estimate_counts_what_the_compiler_builds(name: str) -> None:
    spec = BUILTIN_BLUEPRINTS[name]
    host = HostSignature.model_validate(
        {**CONV, "in_features": 32, "out_features": 16, "padding": [1, 1]}
        if "conv2d" in spec.hosts
        else {"kind": "linear", "in_features": 32, "out_features": 16}
    )
    estimate = estimate_compile(spec, host)
    module = instantiate(spec, host)
    assert estimate.parameters == sum(p.numel() for p in module.parameters())
    example = example_input(host)
    with torch.no_grad():
        out = module(example)
    # At least the example input and the kernel's output are counted.
    assert estimate.activation_bytes >= 4 * (example.numel() + out.numel())
    assert estimate.total < 64 << 20

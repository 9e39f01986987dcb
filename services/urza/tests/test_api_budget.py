"""Memory is bounded before a compile starts: a kernel whose parameters or compile memory
(estimated from sizes, nothing allocated) are over Urza's budget is refused with 422 naming the
estimate and the budget, and absurd host geometry or blueprint kernels are 422, never 500. An
uploaded kernel meets the same budget, measured from what its archive declares before it runs."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.blueprints.builder import instantiate
from esper.contracts import HostSignature
from esper.contracts.api import ErrorBody, ErrorInfo
from esper.kernels.executor import example_input
from esper.testing import ServiceProcess
from esper.testing.hosts import host_for_blueprint
from urza.budget import estimate_compile, estimate_export_upload

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
    assert info.location is not None and info.location[:2] == ["body", "host"], info


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
    host = host_for_blueprint(spec, host)
    estimate = estimate_compile(spec, host)
    module = instantiate(spec, host)
    assert estimate.parameters == sum(p.numel() for p in module.parameters())
    example = example_input(host)
    with torch.no_grad():
        out = module(example)
    # At least the example input and the kernel's output are counted.
    assert estimate.activation_bytes >= 4 * (example.numel() + out.numel())
    assert estimate.total < 64 << 20


# ------------------------------------------------------------------------------------ uploads
UPLOAD_PARAMS = 1000
UPLOAD_MEMORY = 1 << 20  # the smallest URZA_MAX_KERNEL_MEMORY_BYTES allows


class Spread(nn.Module):
    """One weight, but it spreads each input value over `fan` products before summing them:
    the values its graph computes are megabytes while it holds a single parameter."""

    def __init__(self, fan: int) -> None:
        super().__init__()
        self.fan = fan
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1).expand(-1, -1, self.fan) * self.scale).sum(-1)


def _exported(module: nn.Module, width: int) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        module.eval(), (torch.randn(3, width),), dynamic_shapes=({0: batch},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_urza(urza_module_factory: Callable[..., ServiceProcess]) -> ServiceProcess:
    return urza_module_factory(
        URZA_MAX_KERNEL_PARAMS=str(UPLOAD_PARAMS), URZA_MAX_KERNEL_MEMORY_BYTES=str(UPLOAD_MEMORY)
    )


@pytest.fixture
def small(small_urza: ServiceProcess, token: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=small_urza.url, headers=headers, timeout=60) as client:
        yield client


def _upload(
    api: httpx.Client, data: bytes, width: int, name: str, admin: str | None = None
) -> httpx.Response:
    host = {"kind": "linear", "in_features": width, "out_features": width}
    meta = {"name": name, "format": "torchscript" if admin else "export", "host": host}
    files = {"artifact": ("kernel.bin", data, "application/octet-stream")}
    headers = {"X-Esper-Admin-Token": admin} if admin else {}
    return api.post("/kernels", data={"meta": json.dumps(meta)}, files=files, headers=headers)


def _blobs(urza: ServiceProcess) -> list[Path]:
    return sorted(Path(urza.env["URZA_DATA_DIR"]).rglob("*"))


def test_an_upload_over_the_parameter_budget_is_refused(
    small: httpx.Client, small_urza: ServiceProcess
) -> None:
    before, files = _kernels(small), _blobs(small_urza)
    info = _error(
        _upload(small, _exported(nn.Linear(64, 64), 64), 64, "too_wide"), 422, "over_budget"
    )
    assert info.location == ["body", "artifact"]
    assert f"{64 * 64 + 64:,} parameters" in info.message, info.message
    assert f"{UPLOAD_PARAMS:,} (URZA_MAX_KERNEL_PARAMS)" in info.message, info.message
    assert _kernels(small) == before
    assert _blobs(small_urza) == files


def test_an_upload_over_the_memory_budget_is_refused_before_it_runs(
    small: httpx.Client, small_urza: ServiceProcess
) -> None:
    """The archive declares a graph value of batch × 4 × 40,000 floats: about 1.9 MB."""
    before, files = _kernels(small), _blobs(small_urza)
    data = _exported(Spread(40_000), 4)
    info = _error(_upload(small, data, 4, "spread"), 422, "over_budget")
    assert info.location == ["body", "artifact"]
    assert f"{UPLOAD_MEMORY:,} bytes" in info.message, info.message
    assert "URZA_MAX_KERNEL_MEMORY_BYTES" in info.message
    estimate = estimate_export_upload(data)
    assert estimate is not None and estimate.parameters == 1
    assert f"about {estimate.total:,} bytes" in info.message, info.message
    assert _kernels(small) == before
    assert _blobs(small_urza) == files


def test_an_admin_torchscript_upload_meets_the_budget_too(
    small: httpx.Client, small_urza: ServiceProcess, admin_token: str
) -> None:
    """TorchScript keeps its sizes in a pickle: it is measured once loaded, before it runs."""
    before, files = _kernels(small), _blobs(small_urza)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(64, 64)), buffer)
    resp = _upload(small, buffer.getvalue(), 64, "script_too_wide", admin=admin_token)
    info = _error(resp, 422, "over_budget")
    assert f"{64 * 64 + 64:,} parameters" in info.message, info.message
    assert f"{UPLOAD_PARAMS:,} (URZA_MAX_KERNEL_PARAMS)" in info.message, info.message
    assert _kernels(small) == before
    assert _blobs(small_urza) == files


def test_an_upload_within_the_budget_is_stored(small: httpx.Client) -> None:
    resp = _upload(small, _exported(nn.Linear(16, 16), 16), 16, "fits")
    assert resp.status_code == 201, resp.text
    kernel_id = resp.json()["kernel"]["kernel_id"]
    assert resp.json()["kernel"]["params"] == 16 * 16 + 16
    assert kernel_id in _kernels(small)


def test_the_upload_estimate_reads_what_the_archive_declares() -> None:
    module = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 8))
    estimate = estimate_export_upload(_exported(module, 8))
    assert estimate is not None
    # Parameters and buffers (BatchNorm's running statistics and its counter).
    held = [*module.parameters(), *module.buffers()]
    assert estimate.parameters == sum(t.numel() for t in held)
    assert estimate.parameter_bytes == sum(t.numel() * t.element_size() for t in held)
    # At least the input and the three layers' outputs at the exported batch of 3.
    assert estimate.activation_bytes >= 4 * 3 * (8 + 32 + 32 + 8)
    assert estimate_export_upload(b"not a zip") is None

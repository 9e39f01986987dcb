"""Urza's blueprint registry over real HTTP: built-ins, registration (new, identical, conflicting,
invalid, not function-preserving), versions, and a registered blueprint compiled into a kernel."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec
from esper.contracts import KernelResult, Page
from esper.contracts.api import ErrorBody, ErrorInfo
from urza.store import StoredBlueprint

LINEAR_HOST = {"kind": "linear", "in_features": 16, "out_features": 16}


def expect_error(
    resp: httpx.Response, status: int, type_: str, location: Sequence[str | int] | None = None
) -> ErrorInfo:
    """The response is an ErrorBody of this status and type (and location, when given)."""
    assert resp.status_code == status, resp.text
    info = ErrorBody.model_validate(resp.json()).error
    assert info.type == type_, info
    if location is not None:
        assert info.location == list(location), info
    return info


def listing(client: httpx.Client) -> Page[StoredBlueprint]:
    resp = client.get("/blueprints")
    assert resp.status_code == 200, resp.text
    return Page[StoredBlueprint].model_validate(resp.json())


def builtin_json(client: httpx.Client, name: str) -> dict[str, Any]:
    resp = client.get(f"/blueprints/{name}")
    assert resp.status_code == 200, resp.text
    spec: dict[str, Any] = resp.json()["spec"]
    return spec


def custom_spec(client: httpx.Client, name: str, **changes: Any) -> dict[str, Any]:
    """low_rank's JSON as Urza serves it, renamed (and changed)."""
    spec = copy.deepcopy(builtin_json(client, "low_rank"))
    # A new name starts at version 1, whatever version the built-in is at.
    spec.update(
        {"name": name, "version": 1, "description": f"test copy of low_rank as {name}", **changes}
    )
    return spec


# ----------------------------------------------------------------------------------- built-ins
def test_builtins_are_listed(anon: httpx.Client) -> None:
    page = listing(anon)
    builtins = {b.spec.name: b for b in page.items if b.builtin}
    assert set(builtins) == set(BUILTIN_BLUEPRINTS)
    assert len(builtins) == 10
    assert page.total == len(page.items)
    for name, stored in builtins.items():
        assert stored.spec == BUILTIN_BLUEPRINTS[name]
        assert stored.digest.startswith("sha256:")


def test_get_one_builtin(anon: httpx.Client) -> None:
    resp = anon.get("/blueprints/conv3x3")
    assert resp.status_code == 200
    stored = StoredBlueprint.model_validate(resp.json())
    assert stored.builtin
    assert stored.spec == BUILTIN_BLUEPRINTS["conv3x3"]
    version = BUILTIN_BLUEPRINTS["conv3x3"].version
    assert anon.get("/blueprints/conv3x3", params={"version": version}).json() == resp.json()


def test_unknown_blueprint_is_404(anon: httpx.Client) -> None:
    expect_error(anon.get("/blueprints/no_such_thing"), 404, "unknown_blueprint", ["path", "name"])
    expect_error(
        anon.get(
            "/blueprints/low_rank", params={"version": BUILTIN_BLUEPRINTS["low_rank"].version + 1}
        ),
        404,
        "unknown_blueprint",
        ["path", "name"],
    )
    expect_error(
        anon.get("/blueprints/low_rank", params={"version": 0}),
        422,
        "validation_error",
        ["query", "version"],
    )


def test_a_builtin_cannot_be_replaced_at_its_version(api: httpx.Client) -> None:
    before = listing(api)
    spec = builtin_json(api, "low_rank")
    spec["params"] = {"rank": 2}
    expect_error(api.post("/blueprints", json=spec), 409, "conflict", ["body", "version"])
    assert listing(api) == before
    assert (
        StoredBlueprint.model_validate(api.get("/blueprints/low_rank").json()).spec
        == (BUILTIN_BLUEPRINTS["low_rank"])
    )


# -------------------------------------------------------------------------------- registration
def test_register_then_identical_then_conflicting(api: httpx.Client) -> None:
    spec = custom_spec(api, "copied_low_rank")
    created = api.post("/blueprints", json=spec)
    assert created.status_code == 201, created.text
    stored = StoredBlueprint.model_validate(created.json())
    assert not stored.builtin
    assert stored.spec == BlueprintSpec.parse(spec)
    assert api.get("/blueprints/copied_low_rank").json() == created.json()
    assert "copied_low_rank" in {b.spec.name for b in listing(api).items}

    # Key order and spelled-out defaults do not make it different content.
    again = api.post("/blueprints", json=dict(reversed(list(spec.items()))))
    assert again.status_code == 200, again.text
    assert again.json() == created.json()

    before = listing(api)
    conflicting = {**spec, "params": {"rank": 4}}
    info = expect_error(api.post("/blueprints", json=conflicting), 409, "conflict")
    assert info.location == ["body", "version"]
    assert "bump version" in info.message
    assert listing(api) == before
    assert api.get("/blueprints/copied_low_rank").json() == created.json()


def test_versions(api: httpx.Client, anon: httpx.Client) -> None:
    v1 = custom_spec(api, "versioned_low_rank")
    v2 = {**v1, "version": 2, "params": {"rank": 4}}
    assert api.post("/blueprints", json=v1).status_code == 201
    assert api.post("/blueprints", json=v2).status_code == 201

    latest = StoredBlueprint.model_validate(anon.get("/blueprints/versioned_low_rank").json())
    assert latest.spec.version == 2
    assert latest.spec.params == {"rank": 4}
    first = anon.get("/blueprints/versioned_low_rank", params={"version": 1})
    assert StoredBlueprint.model_validate(first.json()).spec == BlueprintSpec.parse(v1)
    expect_error(
        anon.get("/blueprints/versioned_low_rank", params={"version": 3}),
        404,
        "unknown_blueprint",
    )
    # The listing has the latest version of each name, once.
    named = [b for b in listing(anon).items if b.spec.name == "versioned_low_rank"]
    assert [b.spec.version for b in named] == [2]

    # A new version below the latest would never be served: refused.
    before = listing(anon)
    v0 = {**v1, "name": "versioned_low_rank", "version": 1, "params": {"rank": 3}}
    expect_error(api.post("/blueprints", json=v0), 409, "conflict", ["body", "version"])
    assert listing(anon) == before


def _unknown_op(spec: dict[str, Any]) -> None:
    spec["body"][0]["op"] = "frobnicate"


def _bad_size(spec: dict[str, Any]) -> None:
    spec["body"][0]["out"] = "rank +* 2"


def _unknown_size_name(spec: dict[str, Any]) -> None:
    spec["body"][1]["out"] = "out * widening"


def _bad_name(spec: dict[str, Any]) -> None:
    spec["name"] = "Not-A-Name"


def _no_hosts(spec: dict[str, Any]) -> None:
    spec["hosts"] = []


def _extra_field(spec: dict[str, Any]) -> None:
    spec["colour"] = "blue"


@pytest.mark.parametrize(
    ("mutate", "location"),
    [
        (_unknown_op, ["body", "body", 0]),
        (_bad_size, ["body"]),
        (_unknown_size_name, ["body"]),
        (_bad_name, ["body", "name"]),
        (_no_hosts, ["body", "hosts"]),
        (_extra_field, ["body", "colour"]),
    ],
    ids=["unknown_op", "bad_size_expression", "unknown_size_name", "bad_name", "no_hosts", "extra"],
)
def test_invalid_spec_is_422_with_location(
    api: httpx.Client, mutate: Any, location: list[str | int]
) -> None:
    spec = custom_spec(api, "invalid_one")
    mutate(spec)
    before = listing(api)
    info = expect_error(api.post("/blueprints", json=spec), 422, "validation_error", location)
    assert info.details["errors"], info
    assert listing(api) == before
    expect_error(api.get("/blueprints/invalid_one"), 404, "unknown_blueprint")


@pytest.mark.parametrize(
    ("content", "location"),
    [
        (b"", ["body"]),
        (b"null", ["body"]),
        (b"{}", ["body", "name"]),
        (b'{"name": "x', ["body", 9]),  # the unterminated string starts at 9
        (b"[1, 2]", ["body"]),
    ],
    ids=["empty", "null", "empty_object", "truncated_json", "array"],
)
def test_malformed_body_is_422(
    api: httpx.Client, content: bytes, location: list[str | int]
) -> None:
    before = listing(api)
    resp = api.post("/blueprints", content=content, headers={"content-type": "application/json"})
    expect_error(resp, 422, "validation_error", location)
    assert listing(api) == before


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        # sigmoid(0) = 0.5: the zeroed last layer does not make the output zero.
        (
            [{"op": "host_proj", "out": "out"}, {"op": "act", "fn": "sigmoid"}],
            "not function-preserving",
        ),
        # Ends at width 7 on a 16-wide host.
        ([{"op": "host_proj", "out": "rank"}, {"op": "project", "out": 7}], "ends at width 7"),
    ],
    ids=["not_function_preserving", "width_mismatch"],
)
def test_blueprint_failing_its_trial_is_refused(
    api: httpx.Client, body: list[dict[str, Any]], needle: str
) -> None:
    spec = custom_spec(api, "trial_failure", hosts=["linear"], body=body)
    before = listing(api)
    info = expect_error(api.post("/blueprints", json=spec), 422, "invalid_blueprint", ["body"])
    assert needle in info.message
    assert listing(api) == before
    expect_error(api.get("/blueprints/trial_failure"), 404, "unknown_blueprint")


def test_conv_blueprint_failing_on_a_conv_host_is_refused(api: httpx.Client) -> None:
    spec = custom_spec(
        api,
        "bad_groups",
        hosts=["conv2d"],
        body=[
            {"op": "host_proj", "out": 12, "bias": False},
            {"op": "conv", "out": 12, "groups": 5, "kernel": 3},
            {"op": "project", "out": "out"},
        ],
    )
    info = expect_error(api.post("/blueprints", json=spec), 422, "invalid_blueprint", ["body"])
    assert "groups=5" in info.message
    expect_error(api.get("/blueprints/bad_groups"), 404, "unknown_blueprint")


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [({}, 401, "unauthorized"), ({"Authorization": "Bearer wrong"}, 403, "forbidden")],
    ids=["missing", "wrong"],
)
def test_registration_needs_the_token(
    anon: httpx.Client, headers: dict[str, str], status: int, type_: str
) -> None:
    spec = custom_spec(anon, "needs_token")
    before = listing(anon)
    resp = anon.post("/blueprints", json=spec, headers=headers)
    expect_error(resp, status, type_, ["header", "authorization"])
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert listing(anon) == before
    expect_error(anon.get("/blueprints/needs_token"), 404, "unknown_blueprint")


# ------------------------------------------------------------------------ registered → compiled
def test_registered_blueprint_compiles_by_version(api: httpx.Client) -> None:
    v1 = custom_spec(api, "compiled_custom", hosts=["linear"])
    v2 = {**v1, "version": 2, "params": {"rank": 2}}
    assert api.post("/blueprints", json=v1).status_code == 201
    assert api.post("/blueprints", json=v2).status_code == 201

    latest = api.post(
        "/kernels/compile",
        json={"blueprint": "compiled_custom", "host": LINEAR_HOST, "format": "torchscript"},
    )
    assert latest.status_code == 201, latest.text
    kernel = KernelResult.model_validate(latest.json()).kernel
    assert (kernel.blueprint, kernel.blueprint_version) == ("compiled_custom", 2)
    assert kernel.params == 16 * 2 + 2 * 16  # rank 2, no biases

    first = api.post(
        "/kernels/compile",
        json={
            "blueprint": "compiled_custom",
            "blueprint_version": 1,
            "host": LINEAR_HOST,
            "format": "torchscript",
        },
    )
    assert first.status_code == 201, first.text
    old = KernelResult.model_validate(first.json()).kernel
    assert old.blueprint_version == 1
    assert old.kernel_id != kernel.kernel_id
    assert old.params == 16 * 8 + 8 * 16

    expect_error(
        api.post(
            "/kernels/compile",
            json={"blueprint": "compiled_custom", "blueprint_version": 3, "host": LINEAR_HOST},
        ),
        404,
        "unknown_blueprint",
        ["body", "blueprint"],
    )

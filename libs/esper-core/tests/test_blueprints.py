"""Blueprint specs (validation and its messages), size expressions, the library and the builder.

Nothing here compiles a kernel: see test_compiler.py for that.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, get_blueprint, instantiate
from esper.blueprints.sizes import MAX_EXPR_LENGTH, eval_size, parse_size
from esper.blueprints.spec import MAX_OPS
from esper.contracts import HostSignature
from esper.exceptions import (
    BlueprintHostError,
    BlueprintSpecError,
    UnknownBlueprintError,
)
from esper.testing.hosts import host_for_blueprint

LINEAR = HostSignature(kind="linear", in_features=12, out_features=20)
CONV = HostSignature(
    kind="conv2d", in_features=6, out_features=16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)
)
CONV1D = HostSignature(
    kind="conv1d", in_features=6, out_features=16, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)
)
HOSTS = {"linear": LINEAR, "conv2d": CONV, "conv1d": CONV1D}


def spec_dict(
    body: list[dict[str, Any]], hosts: tuple[str, ...] = ("linear",), **extra: Any
) -> dict[str, Any]:
    return {"name": "test_bp", "hosts": list(hosts), "body": body, **extra}


def parse_error(data: object) -> str:
    with pytest.raises(BlueprintSpecError) as caught:
        BlueprintSpec.parse(data)
    return str(caught.value)


# ----------------------------------------------------------------------------- the library


@pytest.mark.parametrize("name", sorted(BUILTIN_BLUEPRINTS))
def test_builtin_spec_round_trips_through_dict_and_json(name: str) -> None:
    spec = BUILTIN_BLUEPRINTS[name]
    assert spec.name == name
    assert BlueprintSpec.parse(spec.model_dump(mode="json")) == spec
    assert BlueprintSpec.parse(spec.model_dump_json()) == spec
    assert BlueprintSpec.parse(spec.model_dump_json().encode()) == spec


@pytest.mark.parametrize(
    ("name", "kind"),
    [(name, kind) for name, spec in sorted(BUILTIN_BLUEPRINTS.items()) for kind in spec.hosts],
)
def test_builtin_instantiates_zero_output_for_every_host_kind_it_lists(
    name: str, kind: str
) -> None:
    host = host_for_blueprint(get_blueprint(name), HOSTS[kind])
    module = instantiate(get_blueprint(name), host)
    x = torch.randn(host.input_shape(3, (11, 9)))
    with torch.no_grad():
        out = module(x)
    assert tuple(out.shape) == host.output_shape(tuple(x.shape))
    assert torch.count_nonzero(out) == 0


def test_library_serves_both_host_kinds() -> None:
    kinds = [kind for spec in BUILTIN_BLUEPRINTS.values() for kind in spec.hosts]
    assert kinds.count("linear") >= 3
    assert kinds.count("conv2d") >= 3
    assert kinds.count("conv1d") == kinds.count("conv2d")


def test_get_blueprint_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(UnknownBlueprintError) as caught:
        get_blueprint("no_such_blueprint")
    message = str(caught.value)
    assert "'no_such_blueprint'" in message
    for name in BUILTIN_BLUEPRINTS:
        assert name in message
    assert isinstance(caught.value, LookupError)


# ----------------------------------------------------------------------------- parsing


def test_parse_accepts_dict_json_text_and_bytes() -> None:
    data = spec_dict([{"op": "project", "out": "out"}], params={"ratio": 0.5})
    from_dict = BlueprintSpec.parse(data)
    assert BlueprintSpec.parse(json.dumps(data)) == from_dict
    assert BlueprintSpec.parse(json.dumps(data).encode()) == from_dict
    assert from_dict.version == 1
    assert from_dict.default_blend == "add"
    assert from_dict.params == {"ratio": 0.5}


def test_parse_does_not_modify_its_input() -> None:
    data = spec_dict(
        [
            {"op": "residual", "body": [{"op": "project", "out": "in"}]},
            {"op": "project", "out": "out"},
        ]
    )
    before = copy.deepcopy(data)
    BlueprintSpec.parse(data)
    assert data == before


@pytest.mark.parametrize("data", ["{not json", "[]", "null", 42, ["name"]])
def test_parse_refuses_text_that_is_not_a_spec(data: object) -> None:
    assert "invalid blueprint spec" in parse_error(data)


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BlueprintSpec.parse(spec_dict([]))


CONV_OK_HEAD = {"op": "host_proj", "out": "out"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            spec_dict([{"op": "frobnicate", "out": "out"}]),
            ["body[0]", "'frobnicate'"],
            id="unknown-op",
        ),
        pytest.param(
            spec_dict([{"out": "out"}]),
            ["body[0]", "'op'"],
            id="op-missing",
        ),
        pytest.param(
            spec_dict([{"op": "act"}, {"op": "project"}]),
            ["body[1] (project).out", "Field required"],
            id="missing-field",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out", "colour": "red"}]),
            ["body[0] (project).colour", "Extra inputs are not permitted"],
            id="extra-field",
        ),
        pytest.param(
            {**spec_dict([{"op": "project", "out": "out"}]), "author": "me"},
            ["author", "Extra inputs are not permitted"],
            id="extra-top-level-field",
        ),
        pytest.param(
            spec_dict([{"op": "act", "fn": "swish"}, {"op": "project", "out": "out"}]),
            ["body[0] (act).fn"],
            id="unknown-activation",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "width * 2"}]),
            ["body[0] (project)", "'width'", "known names: in, out"],
            id="size-unknown-name",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "rank * 2"}], params={"ratio": 2}),
            ["body[0] (project)", "'rank'", "known names: in, out, ratio"],
            id="size-unknown-name-lists-params",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "__import__('os')"}]),
            ["body[0] (project)", "Call is not allowed"],
            id="size-import",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out.bit_length()"}]),
            ["body[0] (project)", "is not allowed"],
            id="size-method-call",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out.real"}]),
            ["body[0] (project)", "Attribute is not allowed"],
            id="size-attribute",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "lambda: 3"}]),
            ["body[0] (project)", "Lambda is not allowed"],
            id="size-lambda",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "'abc'"}]),
            ["body[0] (project)", "Constant is not allowed"],
            id="size-string",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out ** 2"}]),
            ["body[0] (project)", "is not allowed"],
            id="size-power",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out if in else 3"}]),
            ["body[0] (project)", "is not allowed"],
            id="size-conditional",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "max(out, key=1)"}]),
            ["body[0] (project)", "is not allowed"],
            id="size-keyword-argument",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out + ("}]),
            ["body[0] (project)", "is not an expression"],
            id="size-syntax-error",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "+".join(["out"] * 30)}]),
            ["body[0] (project)", f"longer than {MAX_EXPR_LENGTH} characters"],
            id="size-too-long",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": 0}]),
            ["body[0] (project)", "must be ≥ 1"],
            id="size-zero",
        ),
        pytest.param(
            spec_dict([{"op": "residual", "body": [{"op": "project", "out": "nope"}]}]),
            ["body[0].body[0] (project)", "'nope'"],
            id="size-inside-residual",
        ),
        pytest.param(
            spec_dict([{"op": "act"}, {"op": "conv", "out": "out"}]),
            ["body[1] (conv) needs a conv host", "'linear'"],
            id="conv-op-on-linear-host",
        ),
        pytest.param(
            spec_dict(
                [{"op": "depthwise"}, {"op": "project", "out": "out"}], hosts=("conv2d", "linear")
            ),
            ["body[0] (depthwise) needs a conv host"],
            id="depthwise-on-linear-and-conv-host",
        ),
        pytest.param(
            spec_dict(
                [
                    {
                        "op": "residual",
                        "body": [{"op": "residual", "body": [{"op": "conv", "out": "in"}]}],
                    },
                    {"op": "project", "out": "out"},
                ]
            ),
            ["body[0].body[0].body[0] (conv) needs a conv host"],
            id="conv-op-nested-in-residuals-on-linear-host",
        ),
        pytest.param(
            spec_dict(
                [CONV_OK_HEAD, {"op": "residual", "body": [{"op": "host_proj", "out": "out"}]}],
                hosts=("conv2d",),
            ),
            ["body[1].body[0] (host_proj)", "residual body cannot carry the host's geometry"],
            id="host-proj-in-residual",
        ),
        pytest.param(
            spec_dict(
                [CONV_OK_HEAD, {"op": "residual", "body": [{"op": "depthwise", "kernel": "host"}]}],
                hosts=("conv2d",),
            ),
            ["body[1].body[0] (depthwise)", "residual body cannot carry the host's geometry"],
            id="host-kernel-depthwise-in-residual",
        ),
        pytest.param(
            spec_dict(
                [
                    CONV_OK_HEAD,
                    {
                        "op": "residual",
                        "body": [
                            {
                                "op": "residual",
                                "body": [{"op": "conv", "out": "out", "kernel": "host"}],
                            }
                        ],
                    },
                ],
                hosts=("conv2d",),
            ),
            ["body[1].body[0].body[0] (conv)", "residual body cannot carry the host's geometry"],
            id="geometry-in-nested-residual",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], hosts=("conv2d",)),
            ["exactly one top-level op with the host's geometry", "found 0"],
            id="conv-blueprint-without-geometry",
        ),
        pytest.param(
            spec_dict(
                [CONV_OK_HEAD, {"op": "act"}, {"op": "conv", "out": "out", "kernel": "host"}],
                hosts=("conv2d",),
            ),
            [
                "exactly one top-level op with the host's geometry",
                "found 2",
                "body[0] (host_proj)",
                "body[2] (conv)",
            ],
            id="conv-blueprint-with-two-geometry-ops",
        ),
        pytest.param(
            {**spec_dict([{"op": "project", "out": "out"}]), "name": "Bad-Name"},
            ["name", "pattern"],
            id="name-with-capitals-and-dash",
        ),
        pytest.param(
            {**spec_dict([{"op": "project", "out": "out"}]), "name": "x"},
            ["name", "pattern"],
            id="name-too-short",
        ),
        pytest.param(
            {**spec_dict([{"op": "project", "out": "out"}]), "name": "bp_" + "x" * 64},
            ["name", "pattern"],
            id="name-too-long",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], params={"in": 3}),
            ["param name 'in'", "reserved"],
            id="param-named-in",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], params={"in_": 3}),
            ["param name 'in_'", "reserved"],
            id="param-named-in_-would-shadow-in",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], params={"max": 3}),
            ["param name 'max'", "reserved"],
            id="param-named-max",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], params={"2x": 3}),
            ["param name '2x'"],
            id="param-not-an-identifier",
        ),
        pytest.param(
            spec_dict([CONV_OK_HEAD, {"op": "conv", "out": "out", "kernel": 4}], hosts=("conv2d",)),
            ["body[1] (conv).kernel", "odd"],
            id="even-kernel",
        ),
        pytest.param(
            spec_dict([CONV_OK_HEAD, {"op": "depthwise", "kernel": 0}], hosts=("conv2d",)),
            ["body[1] (depthwise).kernel", "odd"],
            id="zero-kernel",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], hosts=("linear", "linear")),
            ["hosts lists a kind twice"],
            id="duplicate-host-kind",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], hosts=("transformer",)),
            ["hosts[0]"],
            id="unknown-host-kind",
        ),
        pytest.param(
            spec_dict([{"op": "project", "out": "out"}], hosts=()),
            ["hosts"],
            id="no-host-kinds",
        ),
        pytest.param(spec_dict([]), ["body"], id="empty-body"),
        pytest.param(
            spec_dict([{"op": "residual", "body": []}, {"op": "project", "out": "out"}]),
            ["body[0] (residual).body"],
            id="empty-residual",
        ),
        pytest.param(
            spec_dict([{"op": "act"}] * MAX_OPS + [{"op": "project", "out": "out"}]),
            [f"more than {MAX_OPS} ops"],
            id="too-many-ops",
        ),
        pytest.param(
            spec_dict(
                [
                    {"op": "residual", "body": [{"op": "act"}] * MAX_OPS},
                    {"op": "project", "out": "out"},
                ]
            ),
            [f"more than {MAX_OPS} ops"],
            id="too-many-ops-counting-residual-bodies",
        ),
        pytest.param(
            spec_dict([{"op": "squeeze_excite", "ratio": 0}, {"op": "project", "out": "out"}]),
            ["body[0] (squeeze_excite).ratio"],
            id="squeeze-excite-ratio-zero",
        ),
        pytest.param(
            {**spec_dict([{"op": "project", "out": "out"}]), "default_blend": "mul"},
            ["default_blend"],
            id="unknown-default-blend",
        ),
    ],
)
def test_invalid_spec_error_names_problem_and_location(
    data: dict[str, Any], expected: list[str]
) -> None:
    message = parse_error(data)
    assert message.startswith("invalid blueprint spec")
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_invalid_spec_error_names_the_blueprint() -> None:
    assert "'test_bp'" in parse_error(spec_dict([{"op": "nope"}]))


def test_spec_is_immutable() -> None:
    spec = get_blueprint("low_rank")
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"  # type: ignore[misc]


def test_valid_conv_spec_with_nested_residuals_and_every_op_parses() -> None:
    spec = BlueprintSpec.parse(
        spec_dict(
            [
                {"op": "depthwise", "kernel": "host"},
                {"op": "norm", "groups": 4},
                {
                    "op": "residual",
                    "body": [
                        {"op": "residual", "body": [{"op": "conv", "out": "in", "kernel": 5}]}
                    ],
                },
                {"op": "glu", "out": "hidden"},
                {"op": "squeeze_excite", "ratio": 0.5},
                {"op": "scale", "init": 0.5},
                {"op": "act", "fn": "tanh"},
                {"op": "project", "out": "out"},
            ],
            hosts=("conv2d",),
            params={"hidden": 12},
        )
    )
    module = instantiate(spec, CONV)
    with torch.no_grad():
        out = module(torch.randn(2, 6, 10, 14))
    assert out.shape == (2, 16, 5, 7)


# ----------------------------------------------------------------------------- size expressions

ENV = {"in": 12.0, "out": 20.0, "ratio": 0.25, "floor": 16.0}


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        (7, 7),
        ("7", 7),
        ("out", 20),
        ("in", 12),
        ("in + out", 32),
        ("out - in", 8),
        ("in * 2 + out // 3", 30),
        ("out / 3", 6),  # 6.67 rounded down
        ("out * ratio", 5),
        ("(in + out) / 2", 16),
        ("-in + out * 2", 28),
        ("max(floor, out * ratio)", 16),
        ("min(in, out)", 12),
        ("max(in, out, 33)", 33),
        ("max(out)", 20),
        ("min(in, 100) + max(1, 2)", 14),  # `in` inside `min` is left alone
        ("in - out", 1),  # never below 1
        ("-out", 1),
        ("ratio", 1),  # 0.25 rounds down to 0, raised to 1
        ("0.5", 1),
    ],
)
def test_eval_size(expr: int | str, value: int) -> None:
    assert eval_size(expr, ENV) == value


def test_eval_size_divide_by_zero_is_a_spec_error() -> None:
    for expr in ("out / (in - 12)", "out // 0", "in / (ratio - 0.25)"):
        with pytest.raises(BlueprintSpecError, match="divides by zero"):
            eval_size(expr, ENV)


def test_eval_size_overflow_is_a_spec_error() -> None:
    with pytest.raises(BlueprintSpecError, match="not finite"):
        eval_size("1e308 * 1e308", ENV)


def test_eval_size_unknown_name_lists_known_names() -> None:
    with pytest.raises(BlueprintSpecError, match=r"'width'; known names: floor, in, out, ratio"):
        eval_size("width", ENV)


@pytest.mark.parametrize("bad", [True, 0, -3])
def test_integer_size_must_be_a_positive_int(bad: int) -> None:
    with pytest.raises(BlueprintSpecError):
        parse_size(bad, {"in", "out"})


def test_parse_size_returns_none_for_plain_int_and_a_tree_for_an_expression() -> None:
    assert parse_size(8, {"in", "out"}) is None
    assert parse_size("in // 2", {"in", "out"}) is not None


@given(
    in_features=st.integers(1, 4096),
    out_features=st.integers(1, 4096),
    ratio=st.floats(0.0, 4.0, allow_nan=False),
)
def test_eval_size_is_an_int_at_least_one_and_floors(
    in_features: int, out_features: int, ratio: float
) -> None:
    env = {"in": float(in_features), "out": float(out_features), "ratio": ratio}
    size = eval_size("max(in, out * ratio) - in // 2", env)
    expected = max(1, int(max(in_features, out_features * ratio) - in_features // 2))
    assert isinstance(size, int)
    assert size == expected


# ----------------------------------------------------------------------------- the builder


def test_linear_only_blueprint_on_conv_host_is_a_host_error() -> None:
    with pytest.raises(BlueprintHostError, match=r"'wide_mlp' serves linear hosts, not conv2d"):
        instantiate(get_blueprint("wide_mlp"), CONV)


def test_conv_only_blueprint_on_linear_host_is_a_host_error() -> None:
    with pytest.raises(
        BlueprintHostError, match=r"'conv3x3' serves conv2d/conv1d hosts, not linear"
    ):
        instantiate(get_blueprint("conv3x3"), LINEAR)


def test_width_that_does_not_end_at_host_out_is_a_host_error() -> None:
    spec = BlueprintSpec.parse(spec_dict([{"op": "project", "out": "out - 1"}]))
    with pytest.raises(
        BlueprintHostError, match=r"'test_bp' ends at width 19, but the host outputs 20"
    ):
        instantiate(spec, LINEAR)


def test_residual_body_that_changes_width_is_a_host_error() -> None:
    spec = BlueprintSpec.parse(
        spec_dict(
            [
                {"op": "residual", "body": [{"op": "project", "out": "in * 2"}]},
                {"op": "project", "out": "out"},
            ]
        )
    )
    with pytest.raises(
        BlueprintHostError, match=r"body\[0\] \(residual\): the body maps width 12 to 24"
    ):
        instantiate(spec, LINEAR)


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (
            {"op": "conv", "out": "out", "groups": 5},
            r"body\[1\] \(conv\): groups=5 must divide in width 16",
        ),
        (
            {"op": "conv", "out": 18, "groups": 4},
            r"groups=4 must divide in width 16 and out width 18",
        ),
    ],
)
def test_conv_groups_that_do_not_divide_are_a_host_error(op: dict[str, Any], expected: str) -> None:
    spec = BlueprintSpec.parse(
        spec_dict([CONV_OK_HEAD, op, {"op": "project", "out": "out"}], hosts=("conv2d",))
    )
    with pytest.raises(BlueprintHostError, match=expected):
        instantiate(spec, CONV)


def test_implausibly_large_size_is_a_host_error() -> None:
    spec = BlueprintSpec.parse(
        spec_dict([{"op": "project", "out": "out * 100000"}, {"op": "project", "out": "out"}])
    )
    with pytest.raises(BlueprintHostError, match="implausibly large"):
        instantiate(spec, LINEAR)


def test_size_that_divides_by_zero_for_this_host_is_a_spec_error() -> None:
    spec = BlueprintSpec.parse(
        spec_dict([{"op": "project", "out": "out / (in - 12)"}, {"op": "project", "out": "out"}])
    )
    instantiate(spec, LINEAR.model_copy(update={"in_features": 13}))
    with pytest.raises(BlueprintSpecError, match="divides by zero"):
        instantiate(spec, LINEAR)


def test_sizes_follow_the_host_and_the_params() -> None:
    module = instantiate(get_blueprint("low_rank"), LINEAR)
    down, up = module
    assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear)
    assert (down.in_features, down.out_features, down.bias) == (12, 8, None)
    assert (up.in_features, up.out_features) == (8, 20)


def test_conv_host_geometry_is_applied_by_host_proj_only() -> None:
    host = HostSignature(
        kind="conv2d",
        in_features=4,
        out_features=8,
        kernel_size=(5, 3),
        stride=(2, 1),
        padding=(2, 1),
        dilation=(1, 2),
    )
    proj, up = instantiate(get_blueprint("low_rank"), host)
    assert isinstance(proj, nn.Conv2d) and isinstance(up, nn.Conv2d)
    assert (proj.kernel_size, proj.stride, proj.padding, proj.dilation) == (
        (5, 3),
        (2, 1),
        (2, 1),
        (1, 2),
    )
    assert (up.kernel_size, up.stride, up.padding) == ((1, 1), (1, 1), (0, 0))


def test_norm_is_group_norm_on_conv_and_layer_norm_on_linear() -> None:
    spec = get_blueprint("bottleneck")
    conv_norm = instantiate(spec, CONV)[1]
    assert isinstance(conv_norm, nn.GroupNorm)
    assert conv_norm.num_channels == 4 and 4 % conv_norm.num_groups == 0
    assert isinstance(instantiate(spec, LINEAR)[1], nn.LayerNorm)


def test_group_norm_groups_are_reduced_to_divide_the_width() -> None:
    spec = BlueprintSpec.parse(
        spec_dict(
            [
                {"op": "host_proj", "out": 6},
                {"op": "norm", "groups": 4},
                {"op": "project", "out": "out"},
            ],
            hosts=("conv2d",),
        )
    )
    norm = instantiate(spec, CONV)[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 2


def test_only_the_last_parametric_layer_starts_at_zero() -> None:
    module = instantiate(get_blueprint("residual_mlp"), LINEAR)
    last = module[-1]
    assert all(torch.count_nonzero(p) == 0 for p in last.parameters())
    assert torch.count_nonzero(module[0].weight) > 0  # the rest is initialised normally


def test_instantiate_is_deterministic_per_seed_and_leaves_the_global_rng_alone() -> None:
    spec = get_blueprint("bottleneck")
    state = torch.random.get_rng_state()
    first, again, other = (instantiate(spec, LINEAR, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first[0].weight, again[0].weight)
    assert not torch.equal(first[0].weight, other[0].weight)


def test_instantiated_seed_learns_from_zero() -> None:
    module = instantiate(get_blueprint("low_rank"), LINEAR)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x, target = torch.randn(8, 12), torch.randn(8, 20)
    loss = nn.functional.mse_loss(module(x), target)
    loss.backward()
    optimizer.step()
    assert nn.functional.mse_loss(module(x), target) < loss

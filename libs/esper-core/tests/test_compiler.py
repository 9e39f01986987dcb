"""compile_blueprint: every built-in for every host kind it serves, in both formats; output shapes
for many host geometries; determinism; measurements; refusals; signing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import (
    BUILTIN_BLUEPRINTS,
    BlueprintSpec,
    compile_blueprint,
    compile_kernel_id,
    get_blueprint,
    instantiate,
)
from esper.contracts import HostSignature, KernelFormat
from esper.exceptions import (
    BlueprintHostError,
    CompileError,
    SignatureMismatchError,
    UnknownBlueprintError,
)
from esper.kernels import KERNEL_ID_RE, KernelArtifact, deserialize, digest_of, verify
from esper.testing.hosts import host_for_blueprint

FORMATS: tuple[KernelFormat, ...] = ("export", "torchscript")
LINEAR = HostSignature(kind="linear", in_features=12, out_features=20)
CONV = HostSignature(
    kind="conv2d", in_features=6, out_features=16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)
)
CONV1D = HostSignature(
    kind="conv1d", in_features=6, out_features=16, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)
)
HOSTS = {"linear": LINEAR, "conv2d": CONV, "conv1d": CONV1D}


def other_input(host: HostSignature, batch: int = 7) -> torch.Tensor:
    """An input whose batch (and, for conv, H×W, non-square) differs from the compile probes."""
    return torch.randn(host.input_shape(batch, (19, 13)))


# ------------------------------------------------------------------------ every built-in


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("name", "kind"),
    [(name, kind) for name, spec in sorted(BUILTIN_BLUEPRINTS.items()) for kind in spec.hosts],
)
def test_every_builtin_compiles_to_a_function_preserving_trainable_kernel(
    name: str, kind: str, fmt: KernelFormat
) -> None:
    host = host_for_blueprint(BUILTIN_BLUEPRINTS[name], HOSTS[kind])
    artifact = compile_blueprint(name, host, fmt)
    meta = artifact.meta
    assert KERNEL_ID_RE.fullmatch(meta.kernel_id)
    assert (meta.name, meta.blueprint, meta.format, meta.host) == (name, name, fmt, host)
    assert meta.blueprint_version == BUILTIN_BLUEPRINTS[name].version
    assert meta.default_blend == BUILTIN_BLUEPRINTS[name].default_blend
    assert meta.digest == digest_of(artifact.data)
    assert meta.size_bytes == len(artifact.data)
    assert meta.hmac_sha256 is None
    assert meta.flops > 0 and meta.latency_us > 0

    kernel = deserialize(artifact)
    assert meta.params == sum(p.numel() for p in kernel.parameters()) > 0
    assert meta.params == sum(
        p.numel() for p in instantiate(get_blueprint(name), host).parameters()
    )
    assert all(p.is_leaf and p.requires_grad for p in kernel.parameters())
    x = other_input(host)
    out = kernel(x)
    assert tuple(out.shape) == host.output_shape(tuple(x.shape))
    assert torch.count_nonzero(out) == 0, "a fresh seed must add nothing"
    out.square().sum().backward()  # zero output: this loss has zero gradient…
    kernel(x).sum().backward()  # …this one reaches the zero-initialised last layer
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in kernel.parameters())


# ------------------------------------------------------------------------ host geometries

GEOMETRIES: list[tuple[str, nn.Module, str]] = [
    ("linear-16-4", nn.Linear(16, 4), "residual_mlp"),
    ("linear-3-33", nn.Linear(3, 33), "gated_linear_unit"),
    ("conv3x3-pad1", nn.Conv2d(3, 8, 3, padding=1), "conv3x3"),
    ("conv3x3-stride2", nn.Conv2d(8, 16, 3, stride=2, padding=1), "depthwise_separable"),
    ("conv1x1", nn.Conv2d(4, 8, 1), "squeeze_excite"),
    ("conv7x7-stride2-pad3", nn.Conv2d(4, 6, 7, stride=2, padding=3), "low_rank"),
    (
        "conv3x3-same-dilation2",
        nn.Conv2d(6, 6, 3, padding="same", dilation=2),
        "depthwise_separable",
    ),
    ("conv3x3-groups4-pad0", nn.Conv2d(8, 12, 3, groups=4), "bottleneck"),
    (
        "conv3x5-stride2x1-dilation2",
        nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        "norm_scale",
    ),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("host_layer", "blueprint"), [g[1:] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES]
)
def test_kernel_output_matches_the_host_at_other_batch_and_spatial_sizes(
    host_layer: nn.Module, blueprint: str, fmt: KernelFormat
) -> None:
    artifact = compile_blueprint(blueprint, host_layer, fmt)
    assert artifact.meta.host == HostSignature.of(host_layer)
    kernel = deserialize(artifact)
    if isinstance(host_layer, nn.Linear):
        inputs = [torch.randn(1, host_layer.in_features), torch.randn(9, host_layer.in_features)]
    else:
        c = host_layer.in_channels
        inputs = [torch.randn(1, c, 16, 16), torch.randn(3, c, 21, 10), torch.randn(2, c, 9, 30)]
    with torch.no_grad():
        for x in inputs:
            out = kernel(x)
            assert out.shape == host_layer(x).shape, f"input {tuple(x.shape)}"
            assert torch.count_nonzero(out) == 0


# ------------------------------------------------------------------------ determinism and ids


@pytest.fixture(scope="module")
def linear_export() -> KernelArtifact:
    return compile_blueprint("bottleneck", LINEAR, "export")


@pytest.fixture(scope="module")
def linear_script() -> KernelArtifact:
    return compile_blueprint("bottleneck", LINEAR, "torchscript")


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_input_compiles_to_the_same_id_and_bytes(
    fmt: KernelFormat, request: pytest.FixtureRequest
) -> None:
    first: KernelArtifact = request.getfixturevalue(
        "linear_export" if fmt == "export" else "linear_script"
    )
    again = compile_blueprint(BUILTIN_BLUEPRINTS["bottleneck"], nn.Linear(12, 20), fmt)
    assert again.meta.kernel_id == first.meta.kernel_id
    assert again.meta.digest == first.meta.digest
    assert again.data == first.data


def test_compiling_leaves_the_global_rng_alone(linear_script: KernelArtifact) -> None:
    state = torch.random.get_rng_state()
    compile_blueprint("low_rank", LINEAR, "torchscript")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_kernel_id_depends_on_blueprint_host_and_format() -> None:
    spec = BUILTIN_BLUEPRINTS["bottleneck"]
    base = compile_kernel_id(spec, LINEAR, "export")
    variants = {
        compile_kernel_id(spec, LINEAR, "torchscript"),
        compile_kernel_id(spec, LINEAR.model_copy(update={"out_features": 21}), "export"),
        compile_kernel_id(spec, CONV, "export"),
        compile_kernel_id(spec, CONV.model_copy(update={"stride": (1, 1)}), "export"),
        compile_kernel_id(BUILTIN_BLUEPRINTS["low_rank"], LINEAR, "export"),
        compile_kernel_id(spec.model_copy(update={"version": spec.version + 1}), LINEAR, "export"),
        compile_kernel_id(spec.model_copy(update={"params": {"ratio": 0.5}}), LINEAR, "export"),
    }
    assert base not in variants
    assert len(variants) == 7
    assert (
        compile_kernel_id(
            BlueprintSpec.parse(spec.model_dump_json()),
            HostSignature.of(nn.Linear(12, 20)),
            "export",
        )
        == base
    )


def test_compiled_ids_differ_by_host_and_format(
    linear_export: KernelArtifact, linear_script: KernelArtifact
) -> None:
    assert linear_export.meta.kernel_id != linear_script.meta.kernel_id
    assert linear_export.meta.kernel_id == compile_kernel_id(
        BUILTIN_BLUEPRINTS["bottleneck"], LINEAR, "export"
    )
    wider = compile_blueprint("bottleneck", nn.Linear(12, 24), "torchscript")
    assert wider.meta.kernel_id != linear_script.meta.kernel_id


# ------------------------------------------------------------------------ measurements


def test_params_and_flops_are_measured(linear_script: KernelArtifact) -> None:
    # bottleneck on 12 → 20: Linear(12, 5), LayerNorm(5), ReLU, Linear(5, 20)
    expected_params = (12 * 5 + 5) + (5 + 5) + (5 * 20 + 20)
    assert linear_script.meta.params == expected_params
    assert linear_script.meta.flops == 2 * (12 * 5 + 5 * 20)
    assert linear_script.meta.latency_us > 0


# ------------------------------------------------------------------------ refusals


def spec(body: list[dict[str, object]], hosts: tuple[str, ...] = ("linear",)) -> BlueprintSpec:
    return BlueprintSpec.parse({"name": "not_preserving", "hosts": list(hosts), "body": body})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            [{"op": "project", "out": "out"}, {"op": "act", "fn": "sigmoid"}], id="ends-in-sigmoid"
        ),
        pytest.param(
            [
                {"op": "project", "out": "out"},
                {"op": "residual", "body": [{"op": "project", "out": "out"}]},
            ],
            id="ends-in-residual",
        ),
        pytest.param(
            [{"op": "project", "out": "out"}, {"op": "squeeze_excite"}], id="ends-in-squeeze-excite"
        ),
        pytest.param(
            [
                {"op": "act", "fn": "tanh"},
                {"op": "scale", "init": 1.0},
                {"op": "act", "fn": "sigmoid"},
            ],
            id="no-zero-path",
        ),
    ],
)
def test_spec_that_is_not_function_preserving_is_refused(body: list[dict[str, object]]) -> None:
    host = HostSignature(kind="linear", in_features=20, out_features=20)
    with pytest.raises(CompileError, match=r"'not_preserving'.*not function-preserving"):
        compile_blueprint(spec(body), host, "torchscript")


def test_unknown_format_is_a_compile_error() -> None:
    with pytest.raises(CompileError, match="unknown kernel format 'onnx'"):
        compile_blueprint("low_rank", LINEAR, "onnx")  # type: ignore[arg-type]


def test_unknown_blueprint_name_is_refused() -> None:
    with pytest.raises(UnknownBlueprintError, match="'nope'"):
        compile_blueprint("nope", LINEAR)


def test_blueprint_for_the_wrong_host_kind_is_refused() -> None:
    with pytest.raises(BlueprintHostError, match="'wide_mlp'"):
        compile_blueprint("wide_mlp", nn.Conv2d(3, 8, 3))


def test_unsupported_host_module_is_refused() -> None:
    with pytest.raises(esper.exceptions.UnsupportedHostError, match="Conv3d"):
        compile_blueprint("low_rank", nn.Conv3d(3, 8, 3))


# ------------------------------------------------------------------------ signing


def test_signing_key_sets_an_hmac_that_verifies_with_that_key_only() -> None:
    key = b"urza-secret"
    artifact = compile_blueprint("bottleneck", LINEAR, "torchscript", signing_key=key)
    assert artifact.meta.hmac_sha256 and len(artifact.meta.hmac_sha256) == 64
    verify(artifact, key)
    verify(artifact)  # the digest alone still checks without a key
    with pytest.raises(SignatureMismatchError, match=artifact.meta.kernel_id):
        verify(artifact, b"another-key")


def test_signing_does_not_change_id_or_bytes(linear_script: KernelArtifact) -> None:
    signed = compile_blueprint("bottleneck", LINEAR, "torchscript", signing_key=b"k")
    assert signed.meta.kernel_id == linear_script.meta.kernel_id
    assert signed.data == linear_script.data

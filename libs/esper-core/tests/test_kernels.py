"""Kernel artifacts (digest and HMAC verification) and the executor (serialize, deserialize, clone,
prepare against a host layer)."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from torch import nn

from esper.blueprints import compile_blueprint, get_blueprint, instantiate
from esper.contracts import HostSignature, KernelFormat
from esper.exceptions import (
    CorruptArtifactError,
    DigestMismatchError,
    KernelDtypeError,
    KernelShapeError,
    SignatureMismatchError,
)
from esper.kernels import (
    KernelArtifact,
    KernelExecutor,
    KernelMeta,
    clone_module,
    deserialize,
    digest_of,
    serialize,
    sign,
    verify,
)
from esper.kernels.artifact import kernel_id_for

FORMATS: tuple[KernelFormat, ...] = ("export", "torchscript")
LINEAR = HostSignature(kind="linear", in_features=12, out_features=20)
CONV = HostSignature(
    kind="conv2d", in_features=4, out_features=8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)
)
KEY = b"urza-signing-key"


@pytest.fixture(scope="module")
def linear_kernels() -> dict[str, KernelArtifact]:
    return {fmt: compile_blueprint("bottleneck", LINEAR, fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def conv_kernels() -> dict[str, KernelArtifact]:
    return {fmt: compile_blueprint("depthwise_separable", CONV, fmt) for fmt in FORMATS}


@pytest.fixture
def artifact(linear_kernels: dict[str, KernelArtifact]) -> KernelArtifact:
    return linear_kernels["torchscript"]


def with_data(artifact: KernelArtifact, data: bytes) -> KernelArtifact:
    return KernelArtifact(artifact.meta, data)


def with_meta(artifact: KernelArtifact, **update: object) -> KernelArtifact:
    return KernelArtifact(artifact.meta.model_copy(update=update), artifact.data)


def randomize(module: nn.Module) -> None:
    """Give every parameter non-zero values, so that outputs actually say something."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


# ------------------------------------------------------------------------ verification


def test_verify_accepts_the_compiled_artifact(artifact: KernelArtifact) -> None:
    verify(artifact)


@pytest.mark.parametrize("position", [0, 100, -1])
def test_verify_refuses_a_flipped_byte(artifact: KernelArtifact, position: int) -> None:
    data = bytearray(artifact.data)
    data[position] ^= 0x01
    with pytest.raises(DigestMismatchError, match=artifact.meta.kernel_id):
        verify(with_data(artifact, bytes(data)))


def test_verify_refuses_truncated_data(artifact: KernelArtifact) -> None:
    with pytest.raises(DigestMismatchError, match=artifact.meta.kernel_id):
        verify(with_data(artifact, artifact.data[:-10]))


def test_verify_refuses_a_recorded_size_that_does_not_match(artifact: KernelArtifact) -> None:
    with pytest.raises(DigestMismatchError, match=f"{artifact.meta.size_bytes + 1} bytes"):
        verify(with_meta(artifact, size_bytes=artifact.meta.size_bytes + 1))


def test_verify_refuses_a_wrong_recorded_digest(artifact: KernelArtifact) -> None:
    with pytest.raises(DigestMismatchError):
        verify(with_meta(artifact, digest=digest_of(b"something else")))


def test_signed_artifact_verifies_with_its_key_only(artifact: KernelArtifact) -> None:
    signed = artifact.signed(KEY)
    assert signed.meta.hmac_sha256 == sign(artifact.meta, KEY)
    assert artifact.meta.hmac_sha256 is None  # signed() returns a new artifact
    verify(signed, KEY)
    with pytest.raises(SignatureMismatchError, match=f"{artifact.meta.kernel_id}: HMAC signature"):
        verify(signed, b"another key")


def test_unsigned_artifact_is_refused_when_a_key_is_required(artifact: KernelArtifact) -> None:
    verify(artifact)
    with pytest.raises(
        SignatureMismatchError, match=f"{artifact.meta.kernel_id}: artifact is unsigned"
    ):
        verify(artifact, KEY)


def test_signature_binds_the_kernel_id(artifact: KernelArtifact) -> None:
    signed = artifact.signed(KEY)
    other_id = kernel_id_for({"another": "kernel"})
    with pytest.raises(SignatureMismatchError):
        verify(with_meta(signed, kernel_id=other_id), KEY)


def test_signature_binds_the_digest(artifact: KernelArtifact) -> None:
    """Re-signed bytes with a recomputed digest still need the key's signature over that digest."""
    signed = artifact.signed(KEY)
    data = artifact.data + b"\0"
    forged = KernelArtifact(
        signed.meta.model_copy(update={"digest": digest_of(data), "size_bytes": len(data)}), data
    )
    verify(forged)  # the digest alone is consistent…
    with pytest.raises(SignatureMismatchError):
        verify(forged, KEY)  # …but the signature is not


def test_signatures_depend_on_key_and_are_stable(artifact: KernelArtifact) -> None:
    assert sign(artifact.meta, KEY) == sign(artifact.meta, KEY)
    assert sign(artifact.meta, KEY) != sign(artifact.meta, b"other")


def test_kernel_id_for_is_canonical() -> None:
    assert kernel_id_for({"a": 1, "b": [1, 2]}) == kernel_id_for({"b": [1, 2], "a": 1})
    assert kernel_id_for({"a": 1}) != kernel_id_for({"a": 2})


# ------------------------------------------------------------------------ deserialize


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not a kernel", b"PK\x03\x04" + b"\0" * 64],
    ids=["empty", "text", "broken-zip"],
)
def test_corrupt_bytes_with_matching_digest_raise_corrupt_artifact(
    linear_kernels: dict[str, KernelArtifact], fmt: KernelFormat, data: bytes
) -> None:
    meta = linear_kernels[fmt].meta.model_copy(
        update={"digest": digest_of(data), "size_bytes": len(data)}
    )
    artifact = KernelArtifact(meta, data)
    verify(artifact)  # the digest vouches for these bytes: only loading them can tell
    with pytest.raises(
        CorruptArtifactError, match=f"kernel {meta.kernel_id}: .*not a loadable {fmt}"
    ):
        deserialize(artifact)


def test_bytes_of_the_other_format_raise_corrupt_artifact(
    linear_kernels: dict[str, KernelArtifact],
) -> None:
    scripted = linear_kernels["torchscript"]
    mislabeled = with_meta(scripted, format="export")
    with pytest.raises(CorruptArtifactError, match="not a loadable export kernel"):
        deserialize(mislabeled)


def test_corrupt_entry_inside_a_valid_zip_raises_corrupt_artifact(
    linear_kernels: dict[str, KernelArtifact],
) -> None:
    original = linear_kernels["torchscript"]
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original.data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            dst.writestr(item, b"\x80garbage" if item.filename.endswith("data.pkl") else payload)
    data = out.getvalue()
    meta = original.meta.model_copy(update={"digest": digest_of(data), "size_bytes": len(data)})
    with pytest.raises(CorruptArtifactError, match=meta.kernel_id):
        deserialize(KernelArtifact(meta, data))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("host", [LINEAR, CONV], ids=["linear", "conv2d"])
def test_serialize_round_trip_keeps_the_function_at_any_batch_size(
    fmt: KernelFormat, host: HostSignature
) -> None:
    name = "bottleneck" if host.kind == "linear" else "depthwise_separable"
    module = instantiate(get_blueprint(name), host)
    randomize(module)
    data = serialize(module, host, fmt)
    meta = KernelMeta(
        kernel_id=kernel_id_for({"test": name, "fmt": fmt, "kind": host.kind}),
        name=name,
        format=fmt,
        host=host,
        digest=digest_of(data),
        size_bytes=len(data),
    )
    # This test serialized the module itself: it trusts the TorchScript it made.
    loaded = deserialize(KernelArtifact(meta, data), trust_torchscript=True)
    shapes = [(1, 12), (6, 12)] if host.kind == "linear" else [(1, 4, 9, 9), (3, 4, 17, 10)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            torch.testing.assert_close(loaded(x), module(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_deserialized_kernel_trains(
    linear_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    kernel = deserialize(linear_kernels[fmt])
    optimizer = torch.optim.SGD(kernel.parameters(), lr=0.05)
    x, target = torch.randn(16, 12), torch.randn(16, 20)
    before = nn.functional.mse_loss(kernel(x), target)
    before.backward()
    optimizer.step()
    assert nn.functional.mse_loss(kernel(x), target) < before


# ------------------------------------------------------------------------ clone_module


@pytest.mark.parametrize("fmt", FORMATS)
def test_clone_has_independent_parameters_and_the_same_function(
    conv_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    template = deserialize(conv_kernels[fmt])
    randomize(template)
    saved = {k: v.clone() for k, v in template.state_dict().items()}
    clone = clone_module(template)
    x = torch.randn(2, 4, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), template(x))
        for p in clone.parameters():
            p.mul_(2.0).add_(1.0)
        changed = clone(x)
        same = template(x)
    assert not torch.allclose(changed, same)
    for k, v in template.state_dict().items():
        assert torch.equal(v, saved[k]), f"{k} of the template changed with its clone"
    template_ptrs = {p.data_ptr() for p in template.parameters()}
    assert not template_ptrs & {p.data_ptr() for p in clone.parameters()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_clone_parameters_are_trainable_leaves(
    conv_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    clone = clone_module(deserialize(conv_kernels[fmt]))
    params = list(clone.parameters())
    assert params and all(p.is_leaf and p.requires_grad for p in params)
    optimizer = torch.optim.Adam(params, lr=0.01)  # refuses non-leaf tensors
    clone(torch.randn(2, 4, 8, 8)).sum().backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in params)
    optimizer.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_in_a_parent_module_follows_train_and_eval(
    conv_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    parent = nn.ModuleDict({"seed": clone_module(deserialize(conv_kernels[fmt]))})
    parent.eval()
    assert not parent["seed"].training
    parent.train()
    assert parent["seed"].training
    with torch.no_grad():
        assert parent["seed"](torch.randn(1, 4, 8, 8)).shape == (1, 8, 4, 4)


# ------------------------------------------------------------------------ KernelExecutor.prepare


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_returns_a_checked_copy_in_the_hosts_dtype(
    linear_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    template = deserialize(linear_kernels[fmt])
    host = nn.Linear(12, 20).double()
    module = KernelExecutor().prepare(template, host, linear_kernels[fmt].meta.kernel_id, "layer1")
    assert module is not template
    params = list(module.parameters())
    assert all(p.dtype == torch.float64 and p.is_leaf and p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in template.parameters())
    x = torch.randn(5, 12, dtype=torch.float64)
    assert module(x).dtype == torch.float64
    torch.optim.SGD(params, lr=0.1)  # accepted: leaves


def test_prepare_leaves_the_global_rng_alone(linear_kernels: dict[str, KernelArtifact]) -> None:
    template, host = deserialize(linear_kernels["export"]), nn.Linear(12, 20)
    state = torch.random.get_rng_state()
    KernelExecutor().prepare(template, host, "krn_x", "layer1")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_refuses_a_kernel_with_the_wrong_output_width(
    linear_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    kernel_id = linear_kernels[fmt].meta.kernel_id
    template = deserialize(linear_kernels[fmt])
    with pytest.raises(
        KernelShapeError, match=rf"kernel {kernel_id} in layer 'head'.*\(3, 20\).*\(3, 21\)"
    ):
        KernelExecutor().prepare(template, nn.Linear(12, 21), kernel_id, "head")


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_refuses_a_kernel_that_cannot_take_the_hosts_input(
    linear_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    kernel_id = linear_kernels[fmt].meta.kernel_id
    template = deserialize(linear_kernels[fmt])
    with pytest.raises(
        KernelShapeError, match=rf"kernel {kernel_id} in layer 'body.0'.*probe forward"
    ):
        KernelExecutor().prepare(template, nn.Linear(16, 20), kernel_id, "body.0")


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_refuses_a_conv_kernel_with_the_wrong_spatial_shape(
    conv_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    kernel_id = conv_kernels[fmt].meta.kernel_id
    template = deserialize(conv_kernels[fmt])
    host = nn.Conv2d(4, 8, 3, stride=1, padding=1)  # the kernel halves H and W
    with pytest.raises(
        KernelShapeError, match=rf"kernel {kernel_id} in layer 'conv'.*output shape"
    ):
        KernelExecutor().prepare(template, host, kernel_id, "conv")


class HalfPrecisionOutput(nn.Module):
    """A kernel that computes in the host's dtype but hands back float16."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).half()


class TupleOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_prepare_refuses_a_kernel_with_the_wrong_output_dtype() -> None:
    with pytest.raises(KernelDtypeError, match=r"kernel krn_half in layer 'fc'.*float16.*float32"):
        KernelExecutor().prepare(HalfPrecisionOutput(), nn.Linear(12, 20), "krn_half", "fc")


def test_prepare_refuses_a_kernel_whose_output_is_not_a_tensor() -> None:
    with pytest.raises(KernelShapeError, match=r"kernel krn_tuple in layer 'fc'.*tuple"):
        KernelExecutor().prepare(TupleOutput(), nn.Linear(12, 12), "krn_tuple", "fc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_moves_the_kernel_to_the_hosts_device(
    conv_kernels: dict[str, KernelArtifact], fmt: KernelFormat
) -> None:
    host = nn.Conv2d(4, 8, 3, stride=2, padding=1).cuda()
    cuda_state = torch.cuda.get_rng_state()
    module = KernelExecutor().prepare(deserialize(conv_kernels[fmt]), host, "krn_gpu", "conv")
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert all(p.is_cuda for p in module.parameters())
    x = torch.randn(2, 4, 12, 10, device="cuda")
    assert module(x).shape == host(x).shape

"""The job's side of the kernel trust model (esper.kernels.inspection): a kernel runs only after
its program was inspected, and only tensor-math operators pass; TorchScript, whose loading runs
code first, loads only when someone vouches for it.

Hostile kernels come from esper.testing.hostile_kernels: each touches only a marker file in the
test's temp directory, so a broken check fails a test here (the marker exists, or the reason does
not name the operator) and harms nothing.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.blueprints.compiler import compile_blueprint
from esper.blueprints.library import BUILTIN_BLUEPRINTS
from esper.blueprints.spec import BlueprintSpec
from esper.contracts import HostSignature, KernelMeta
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import (
    ArtifactError,
    CorruptArtifactError,
    SignatureMismatchError,
    UnsafeKernelError,
    UntrustedKernelError,
)
from esper.kernels import KernelCache
from esper.kernels.artifact import KernelArtifact, digest_of, kernel_id_for, sign
from esper.kernels.executor import deserialize, export_program
from esper.kernels.inspection import inspect_export_program, inspect_script_module
from esper.registry import LocalKernelRegistry
from esper.testing import hostile_kernels as hostile
from esper.testing.hosts import host_for_blueprint

HOST = HostSignature(kind="linear", in_features=hostile.WIDTH, out_features=hostile.WIDTH)
HOSTS = {
    "linear": HostSignature(kind="linear", in_features=12, out_features=10),
    "conv2d": HostSignature(
        kind="conv2d", in_features=6, out_features=8, kernel_size=(3, 3), padding=(1, 1)
    ),
    "conv1d": HostSignature(
        kind="conv1d", in_features=6, out_features=8, kernel_size=(1, 3), padding=(0, 1)
    ),
}
KEY = b"inspection-test-key"


def artifact_of(data: bytes, fmt: KernelFormat, **meta: Any) -> KernelArtifact:
    """An artifact as a tier would hand it over: its id, digest and size match its bytes."""
    return KernelArtifact(
        KernelMeta(
            kernel_id=kernel_id_for({"test": digest_of(data), "fmt": fmt, **meta}),
            name="hostile",
            format=fmt,
            host=HOST,
            digest=digest_of(data),
            size_bytes=len(data),
            **meta,
        ),
        data,
    )


@pytest.fixture(scope="module", autouse=True)
def _nap_registered() -> None:
    hostile.register_nap()  # so a kernel calling it scripts, exports and, unchecked, would run


def marker_for(tmp_path: Path, case: str) -> Path:
    if case == "reads_a_file":
        secret = tmp_path / "secret"
        secret.write_bytes(b"abcd")
        return secret
    return tmp_path / f"marker-{case}"


def nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["secret"])


# ------------------------------------------------------------------- what the compiler emits
@pytest.mark.parametrize("fmt", ["export", "torchscript"])
@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("name", sorted(BUILTIN_BLUEPRINTS))
def test_every_builtin_blueprint_passes_inspection(name: str, host: str, fmt: KernelFormat) -> None:
    """The allow-list covers every operator the blueprint library compiles to, for both hosts
    and both formats, and the compiler vouches for its own output (signed with it)."""
    spec, signature = BUILTIN_BLUEPRINTS[name], HOSTS[host]
    if signature.kind not in spec.hosts:
        pytest.skip(f"{name} does not serve {host} hosts")
    signature = host_for_blueprint(spec, signature)
    artifact = compile_blueprint(spec, signature, fmt, signing_key=KEY)
    assert artifact.meta.vouched_by == "compiler"
    assert artifact.meta.hmac_sha256 == sign(artifact.meta, KEY)
    module = deserialize(artifact)  # inspects; raises on any operator off the list
    if fmt == "torchscript":
        assert isinstance(module, torch.jit.ScriptModule)
        inspect_script_module(module, name)
    else:
        from esper.blueprints.builder import instantiate

        inspect_export_program(export_program(instantiate(spec, signature), signature), name)


@pytest.mark.parametrize("fn", ["relu", "gelu", "silu", "tanh", "sigmoid"])
def test_every_activation_a_blueprint_may_name_passes_inspection(fn: str) -> None:
    """Registered blueprints may pick any activation of the vocabulary, not only the library's."""
    spec = BlueprintSpec.parse(
        {
            "name": f"act_{fn}",
            "hosts": ["linear", "conv2d", "conv1d"],
            "body": [
                {"op": "host_proj", "out": "out"},
                {"op": "act", "fn": fn},
                {"op": "project", "out": "out"},
            ],
        }
    )
    for host in HOSTS.values():
        for fmt in ("export", "torchscript"):
            deserialize(compile_blueprint(spec, host, fmt))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hostile kernels
@pytest.mark.parametrize("case", list(hostile.EXPORT_KERNELS))
def test_hostile_export_kernels_are_refused_before_they_run(tmp_path: Path, case: str) -> None:
    make, operator = hostile.EXPORT_KERNELS[case]
    artifact = artifact_of(make(str(marker_for(tmp_path, case))), "export")
    with pytest.raises(UnsafeKernelError, match=f"calls operator {operator}"):
        deserialize(artifact)
    nothing_written(tmp_path)


@pytest.mark.parametrize("case", list(hostile.TORCHSCRIPT_KERNELS))
def test_hostile_torchscript_kernels_are_refused(tmp_path: Path, case: str) -> None:
    """Unvouched TorchScript is not even loaded; vouched for (or trusted by the caller) it is
    loaded, and its methods are inspected before anything calls forward."""
    make, operator = hostile.TORCHSCRIPT_KERNELS[case]
    data = hostile.torchscript_bytes(make(str(marker_for(tmp_path, case))))
    with pytest.raises(UntrustedKernelError, match="TorchScript runs code from the archive"):
        deserialize(artifact_of(data, "torchscript"))
    with pytest.raises(UnsafeKernelError, match=f"calls operator {operator}"):
        deserialize(artifact_of(data, "torchscript", vouched_by="admin"))
    with pytest.raises(UnsafeKernelError, match=f"calls operator {operator}"):
        deserialize(artifact_of(data, "torchscript"), trust_torchscript=True)
    nothing_written(tmp_path)


# ------------------------------------------------------------- the cache: the job's load path
@pytest.mark.parametrize(
    ("fmt", "case"),
    [
        *(("export", case) for case in hostile.EXPORT_KERNELS),
        *(("torchscript", case) for case in hostile.TORCHSCRIPT_KERNELS),
    ],
)
def test_the_cache_refuses_hostile_kernels_from_a_tier(
    tmp_path: Path, fmt: KernelFormat, case: str
) -> None:
    """A tier that hands a job a hostile kernel (a tampered store; a germinate decision naming
    it) gets it refused, counted and never cached; with trust_torchscript on, TorchScript is
    still inspected."""
    work = tmp_path / "work"
    work.mkdir()
    if fmt == "export":
        make, operator = hostile.EXPORT_KERNELS[case]
        data = make(str(marker_for(work, case)))
    else:
        script, operator = hostile.TORCHSCRIPT_KERNELS[case]
        data = hostile.torchscript_bytes(script(str(marker_for(work, case))))
    artifact = artifact_of(data, fmt, vouched_by="admin" if fmt == "torchscript" else None)
    registry = LocalKernelRegistry(tmp_path / "registry")
    registry.publish(artifact)
    for trust in (False, True):
        cache = KernelCache([registry], trust_torchscript=trust)
        with pytest.raises(UnsafeKernelError, match=f"calls operator {operator}"):
            cache.get_sync(artifact.meta.kernel_id)
        assert artifact.meta.kernel_id not in cache
        assert cache.stats()["local"]["rejected"] == 1
        with pytest.raises(UnsafeKernelError, match=operator):
            cache.put(artifact)
        assert len(cache) == 0
    nothing_written(work)


def test_the_cache_loads_torchscript_only_when_vouched_for_or_trusted(tmp_path: Path) -> None:
    compiled = compile_blueprint("low_rank", HOST, "torchscript", signing_key=KEY)
    unvouched_meta = compiled.meta.model_copy(update={"vouched_by": None, "hmac_sha256": None})
    unvouched = KernelArtifact(unvouched_meta, compiled.data).signed(KEY)
    registry = LocalKernelRegistry()
    registry.publish(unvouched)

    refusing = KernelCache([registry], signing_key=KEY)
    with pytest.raises(UntrustedKernelError, match=unvouched.meta.kernel_id):
        refusing.get_sync(unvouched.meta.kernel_id)
    assert unvouched.meta.kernel_id not in refusing

    trusting = KernelCache([registry], signing_key=KEY, trust_torchscript=True)
    assert isinstance(trusting.get_sync(unvouched.meta.kernel_id).template, torch.jit.ScriptModule)

    # Vouching is part of what is signed: a tier cannot grant it to an artifact.
    forged = KernelArtifact(
        unvouched.meta.model_copy(update={"vouched_by": "admin"}), compiled.data
    )
    with pytest.raises(SignatureMismatchError):
        KernelCache([], signing_key=KEY).put(forged)
    KernelCache([], signing_key=KEY).put(compiled)  # the compiler's own signed word is kept


# ----------------------------------------------------------- the archive around the program
@pytest.fixture(scope="module")
def plain_export() -> bytes:
    return compile_blueprint("low_rank", HOST, "export").data


def _edited(data: bytes, edit: Any) -> KernelArtifact:
    return artifact_of(hostile.edit_program(data, edit), "export")


def test_guard_code_in_an_archive_never_runs(tmp_path: Path, plain_export: bytes) -> None:
    """torch's .module() exec()s an archive's guards_code: it is dropped before loading."""
    marker = tmp_path / "guard-ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"

    def add_guard(program: dict[str, Any]) -> None:
        program["guards_code"] = [code]

    module = deserialize(_edited(plain_export, add_guard))
    module(torch.randn(2, hostile.WIDTH))
    assert not marker.exists()


def test_a_symbolic_expression_that_is_code_is_refused(tmp_path: Path, plain_export: bytes) -> None:
    """torch parses each symbolic size with sympy.sympify, which evals: only sympy arithmetic
    passes."""
    marker = tmp_path / "sympify-ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def poison(program: dict[str, Any]) -> None:
        text = json.dumps(program)
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        program.clear()
        program.update(json.loads(text[:start] + payload.replace('"', "'") + text[end:]))

    with pytest.raises(UnsafeKernelError, match="symbolic size expression"):
        deserialize(_edited(plain_export, poison))
    assert not marker.exists()


def test_a_name_that_would_be_source_is_refused(plain_export: bytes) -> None:
    """fx generates Python source from parameter names: quotes and brackets are refused."""

    def rename(program: dict[str, Any]) -> None:
        text = json.dumps(program).replace('"p_', '"p\\" + str(1) + \\"')
        program.clear()
        program.update(json.loads(text))

    with pytest.raises(UnsafeKernelError, match="not a plain identifier"):
        deserialize(_edited(plain_export, rename))


def test_pickled_payloads_and_foreign_files_are_refused(plain_export: bytes) -> None:
    """torch would unpickle these with weights_only=False (or load a compiled library)."""

    def pickled(name: str, content: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(content)
            for payload in config["config"].values():
                payload["use_pickle"] = True
            return json.dumps(config).encode()
        return content

    data = hostile.rewrite_archive(plain_export, pickled)
    with pytest.raises(UnsafeKernelError, match="is pickled"):
        deserialize(artifact_of(data, "export"))

    buffer = io.BytesIO(plain_export)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(out, "w") as dst:
        prefix = src.namelist()[0].split("/", 1)[0]
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr(f"{prefix}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsafeKernelError, match="aotinductor"):
        deserialize(artifact_of(out.getvalue(), "export"))


def test_garbage_is_corrupt_not_unsafe() -> None:
    for data in (b"", b"not a zip", hostile.torchscript_bytes(hostile.Prints())):
        with pytest.raises(CorruptArtifactError, match="not a loadable export kernel"):
            deserialize(artifact_of(data, "export"))
    assert issubclass(UnsafeKernelError, ArtifactError)

"""LocalKernelRegistry: publish, tag, resolve, look up, list; refusals that leave the state as it
was; a directory-backed registry that survives a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import esper.registry
from esper.contracts import HostSignature
from esper.exceptions import ConfigError, DigestMismatchError, UnknownKernelError
from esper.kernels import KernelArtifact, KernelCache, KernelMeta, digest_of
from esper.kernels.artifact import kernel_id_for
from esper.registry import LocalKernelRegistry, default_registry

HOST = HostSignature(kind="linear", in_features=8, out_features=4)


def make_artifact(label: str, name: str = "low_rank", created_at: float = 0.0) -> KernelArtifact:
    """An artifact with consistent digest and size. The registry never loads the bytes, so they
    need not be a real kernel (the cache tests use real ones)."""
    data = f"kernel bytes of {label}".encode()
    meta = KernelMeta(
        kernel_id=kernel_id_for({"label": label}),
        name=name,
        format="export",
        host=HOST,
        digest=digest_of(data),
        size_bytes=len(data),
        created_at=created_at,
    )
    return KernelArtifact(meta, data)


def fetch(registry: LocalKernelRegistry, kernel_id: str) -> KernelArtifact | None:
    return asyncio.run(registry.fetch(kernel_id))


def resolve(registry: LocalKernelRegistry, ref: str) -> str | None:
    return asyncio.run(registry.resolve(ref))


def snapshot(registry: LocalKernelRegistry) -> tuple[dict[str, str], list[str]]:
    return registry.tags(), [m.kernel_id for m in registry.list()]


@pytest.fixture
def one() -> KernelArtifact:
    return make_artifact("one", created_at=1.0)


@pytest.fixture
def two() -> KernelArtifact:
    return make_artifact("two", name="bottleneck", created_at=2.0)


# ------------------------------------------------------------------------ publish and read


def test_publish_then_lookup_fetch_and_resolve_by_id(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    meta = registry.publish(one)
    assert meta == one.meta
    assert registry.lookup(one.meta.kernel_id) == one.meta
    assert resolve(registry, one.meta.kernel_id) == one.meta.kernel_id
    fetched = fetch(registry, one.meta.kernel_id)
    assert fetched is not None and fetched.data == one.data and fetched.meta == one.meta


def test_publish_with_tags_makes_them_resolve(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    registry.publish(one, tags=["efficiency_kernel_v1", "latest"])
    assert registry.tags() == {
        "efficiency_kernel_v1": one.meta.kernel_id,
        "latest": one.meta.kernel_id,
    }
    assert resolve(registry, "efficiency_kernel_v1") == one.meta.kernel_id
    assert registry.lookup("latest") == one.meta


def test_tag_moves_to_another_kernel(
    registry: LocalKernelRegistry, one: KernelArtifact, two: KernelArtifact
) -> None:
    registry.publish(one, tags=["prod"])
    registry.publish(two)
    registry.tag("prod", two.meta.kernel_id)
    assert registry.lookup("prod") == two.meta
    assert [m.kernel_id for m in registry.list(tag="prod")] == [two.meta.kernel_id]


def test_list_filters_by_name_and_tag_in_creation_order(
    registry: LocalKernelRegistry, one: KernelArtifact, two: KernelArtifact
) -> None:
    three = make_artifact("three", name="low_rank", created_at=0.5)
    for artifact in (one, two, three):
        registry.publish(artifact)
    registry.tag("v1", one.meta.kernel_id)
    assert [m.kernel_id for m in registry.list()] == [
        three.meta.kernel_id,
        one.meta.kernel_id,
        two.meta.kernel_id,
    ]
    assert [m.kernel_id for m in registry.list(name="low_rank")] == [
        three.meta.kernel_id,
        one.meta.kernel_id,
    ]
    assert registry.list(name="bottleneck") == [two.meta]
    assert registry.list(tag="v1") == [one.meta]
    assert registry.list(name="bottleneck", tag="v1") == []
    assert registry.list(tag="nobody") == []
    assert registry.list(name="nothing") == []


def test_unknown_refs_are_misses_for_the_cache_and_errors_for_lookup(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    registry.publish(one)
    missing = kernel_id_for({"missing": 1})
    assert resolve(registry, "no_such_tag") is None
    assert resolve(registry, missing) is None
    assert fetch(registry, missing) is None
    with pytest.raises(UnknownKernelError, match="'no_such_tag'"):
        registry.lookup("no_such_tag")


def test_publishing_twice_keeps_one_entry(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    registry.publish(one, tags=["a"])
    registry.publish(one, tags=["b"])
    assert len(registry.list()) == 1
    assert registry.tags() == {"a": one.meta.kernel_id, "b": one.meta.kernel_id}


# ------------------------------------------------------------------------ refusals


BAD_TAGS = [
    "",
    "has space",
    "-leading-dash",
    ".hidden",
    "slash/tag",
    "newline\n",
    "trailing-newline-only\n",
    "x" * 129,
    "krn_0123456789abcdef01234567",  # looks like a kernel id
    "ünïcode",
]


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_bad_tag_is_refused_and_nothing_changes(
    registry: LocalKernelRegistry, one: KernelArtifact, tag: str
) -> None:
    registry.publish(one, tags=["good"])
    before = snapshot(registry)
    with pytest.raises(ConfigError, match="tag"):
        registry.tag(tag, one.meta.kernel_id)
    assert snapshot(registry) == before
    assert resolve(registry, tag) is None


@pytest.mark.parametrize("tag", ["a", "v1", "efficiency_kernel_v1", "Model.v2-rc1", "x" * 128])
def test_good_tags_are_accepted(
    registry: LocalKernelRegistry, one: KernelArtifact, tag: str
) -> None:
    registry.publish(one)
    registry.tag(tag, one.meta.kernel_id)
    assert registry.lookup(tag) == one.meta


def test_publish_with_a_bad_tag_stores_nothing(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    with pytest.raises(ConfigError):
        registry.publish(one, tags=["ok", "not ok"])
    assert snapshot(registry) == ({}, [])
    assert fetch(registry, one.meta.kernel_id) is None


def test_tagging_an_unknown_kernel_is_refused(
    registry: LocalKernelRegistry, one: KernelArtifact
) -> None:
    registry.publish(one, tags=["v1"])
    missing = kernel_id_for({"missing": 1})
    with pytest.raises(UnknownKernelError, match=rf"'v2'.*{missing}"):
        registry.tag("v2", missing)
    with pytest.raises(UnknownKernelError):
        registry.tag("v1", missing)  # an existing tag is not moved to nothing either
    assert registry.tags() == {"v1": one.meta.kernel_id}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: KernelArtifact(a.meta, a.data + b"!"),
        lambda a: KernelArtifact(a.meta, a.data[:-1]),
        lambda a: KernelArtifact(a.meta.model_copy(update={"digest": digest_of(b"x")}), a.data),
    ],
    ids=["extra-byte", "truncated", "wrong-digest"],
)
def test_publishing_an_artifact_with_a_wrong_digest_stores_nothing(
    tmp_path: Path, one: KernelArtifact, tamper: Callable[[KernelArtifact], KernelArtifact]
) -> None:
    registry = LocalKernelRegistry(tmp_path)
    with pytest.raises(DigestMismatchError, match=one.meta.kernel_id):
        registry.publish(tamper(one), tags=["v1"])
    assert snapshot(registry) == ({}, [])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert snapshot(LocalKernelRegistry(tmp_path)) == ({}, [])


# ------------------------------------------------------------------------ on disk


def test_directory_registry_survives_a_restart(
    tmp_path: Path, one: KernelArtifact, two: KernelArtifact
) -> None:
    signed = KernelArtifact(one.meta.model_copy(update={"hmac_sha256": "ab" * 32}), one.data)
    first = LocalKernelRegistry(tmp_path)
    first.publish(signed, tags=["v1"])
    first.publish(two)
    first.tag("latest", two.meta.kernel_id)
    del first

    again = LocalKernelRegistry(tmp_path)
    assert again.tags() == {"v1": one.meta.kernel_id, "latest": two.meta.kernel_id}
    assert again.lookup("v1") == signed.meta
    assert again.lookup(two.meta.kernel_id) == two.meta
    fetched = fetch(again, one.meta.kernel_id)
    assert fetched is not None and fetched.data == one.data and fetched.meta == signed.meta
    assert [m.kernel_id for m in again.list()] == [one.meta.kernel_id, two.meta.kernel_id]


def test_directory_layout_is_content_addressed_with_no_leftover_temp_files(
    tmp_path: Path, one: KernelArtifact
) -> None:
    LocalKernelRegistry(tmp_path).publish(one, tags=["v1"])
    blob = tmp_path / "blobs" / one.meta.digest.removeprefix("sha256:")
    assert blob.read_bytes() == one.data
    assert (
        json.loads((tmp_path / "kernels" / f"{one.meta.kernel_id}.json").read_text())["digest"]
        == one.meta.digest
    )
    assert json.loads((tmp_path / "tags.json").read_text()) == {"v1": one.meta.kernel_id}
    assert not [p for p in tmp_path.rglob(".*")]


def test_restart_drops_tags_that_point_at_missing_kernels(
    tmp_path: Path, one: KernelArtifact
) -> None:
    LocalKernelRegistry(tmp_path).publish(one, tags=["v1"])
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"v1": one.meta.kernel_id, "ghost": kernel_id_for({"gone": 1})}))
    assert LocalKernelRegistry(tmp_path).tags() == {"v1": one.meta.kernel_id}


def test_an_in_memory_registry_writes_nothing(
    tmp_path: Path, one: KernelArtifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    LocalKernelRegistry().publish(one, tags=["v1"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ compile, cache, default


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compile_publishes_a_kernel_the_cache_loads_by_tag_after_a_restart(
    tmp_path: Path, one_thread: None
) -> None:
    host = nn.Linear(8, 4)
    meta = LocalKernelRegistry(tmp_path).compile("low_rank", host, "torchscript", tags=["eff"])
    assert meta.host == HostSignature.of(host) and meta.blueprint == "low_rank"

    cache = KernelCache([LocalKernelRegistry(tmp_path)])
    entry = cache.get_sync("eff")
    assert entry.meta == meta
    x = torch.randn(3, 8)
    assert torch.count_nonzero(entry.template(x)) == 0


def test_default_registry_is_one_instance_kept_in_esper_kernel_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(esper.registry, "_default", None)
    monkeypatch.setenv("ESPER_KERNEL_DIR", str(tmp_path))
    registry = default_registry()
    assert registry is default_registry()
    assert registry.root == tmp_path


def test_default_registry_without_the_variable_is_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(esper.registry, "_default", None)
    monkeypatch.delenv("ESPER_KERNEL_DIR", raising=False)
    assert default_registry().root is None

"""KernelStore on real files: blueprints, kernels, tags, listing, integrity, restarts, threads."""

from __future__ import annotations

import base64
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.blueprints import BUILTIN_BLUEPRINTS, BlueprintSpec, compile_blueprint
from esper.exceptions import (
    ConfigError,
    CorruptArtifactError,
    DigestMismatchError,
    UnknownBlueprintError,
    UnknownKernelError,
)
from esper.kernels.artifact import KernelArtifact, digest_of
from urza.store import KernelStore, StoredBlueprint, spec_digest

CUSTOM: dict[str, Any] = {
    "name": "tiny_branch",
    "version": 1,
    "description": "a test blueprint",
    "hosts": ["linear"],
    "params": {"rank": 4},
    "body": [
        {"op": "host_proj", "out": "rank", "bias": False},
        {"op": "project", "out": "out", "bias": False},
    ],
}


def custom(**changes: Any) -> BlueprintSpec:
    return BlueprintSpec.parse({**CUSTOM, **changes})


@pytest.fixture(scope="module")
def artifact() -> KernelArtifact:
    return compile_blueprint("low_rank", torch.nn.Linear(8, 8))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KernelStore]:
    s = KernelStore(tmp_path / "urza")
    yield s
    s.close()


def variant(artifact: KernelArtifact, index: int, **update: Any) -> KernelArtifact:
    """Another kernel with the same bytes: its own id and creation time."""
    changes = {"kernel_id": f"krn_{index:024x}", "created_at": 1000.0 + index, **update}
    return KernelArtifact(artifact.meta.model_copy(update=changes), artifact.data)


def other_bytes(artifact: KernelArtifact) -> KernelArtifact:
    """The same kernel id naming different bytes."""
    data = artifact.data + b"\x00"
    meta = artifact.meta.model_copy(update={"digest": digest_of(data), "size_bytes": len(data)})
    return KernelArtifact(meta, data)


def blob_of(store: KernelStore, artifact: KernelArtifact) -> Path:
    return store.blobs / artifact.meta.digest.removeprefix("sha256:")


# ---------------------------------------------------------------------------------- blueprints
def test_put_and_get_blueprint(store: KernelStore) -> None:
    stored, created = store.put_blueprint(custom())
    assert created
    assert stored.spec == custom()
    assert not stored.builtin
    assert stored.digest == spec_digest(custom())
    assert store.get_blueprint("tiny_branch") == stored
    assert store.get_blueprint("tiny_branch", 1) == stored


def test_same_blueprint_again_is_a_noop(store: KernelStore) -> None:
    first, _ = store.put_blueprint(custom())
    again, created = store.put_blueprint(custom())
    assert not created
    assert again == first
    assert store.counts()["blueprint_versions"] == 1


def test_blueprint_digest_ignores_key_order_and_spelled_out_defaults() -> None:
    reordered = BlueprintSpec.parse(dict(reversed(list(CUSTOM.items()))))
    explicit = custom(default_blend="add")
    assert spec_digest(reordered) == spec_digest(explicit) == spec_digest(custom())
    assert spec_digest(custom(description="changed")) != spec_digest(custom())


def test_changed_blueprint_needs_a_new_version(store: KernelStore) -> None:
    store.put_blueprint(custom())
    with pytest.raises(ConfigError, match="version 1 already exists with different content"):
        store.put_blueprint(custom(description="changed"))
    v2, created = store.put_blueprint(custom(version=2, description="changed"))
    assert created
    assert store.get_blueprint("tiny_branch") == v2
    assert store.get_blueprint("tiny_branch", 1).spec.description == "a test blueprint"
    # v1 is still recognised as stored, even though it is no longer the latest.
    assert store.put_blueprint(custom())[1] is False


def test_blueprint_version_below_the_latest_is_refused(store: KernelStore) -> None:
    store.put_blueprint(custom(version=3))
    with pytest.raises(ConfigError, match="older than the stored latest version 3"):
        store.put_blueprint(custom(version=2))


def test_unknown_blueprint(store: KernelStore) -> None:
    with pytest.raises(UnknownBlueprintError, match="nope"):
        store.get_blueprint("nope")
    store.put_blueprint(custom())
    with pytest.raises(UnknownBlueprintError, match="version 7"):
        store.get_blueprint("tiny_branch", 7)


def test_list_blueprints_latest_of_each_sorted(store: KernelStore) -> None:
    for spec in BUILTIN_BLUEPRINTS.values():
        store.put_blueprint(spec, builtin=True)
    store.put_blueprint(custom())
    store.put_blueprint(custom(version=2, description="v2"))
    listed = store.list_blueprints()
    names = [b.spec.name for b in listed]
    assert names == sorted([*BUILTIN_BLUEPRINTS, "tiny_branch"])
    assert next(b for b in listed if b.spec.name == "tiny_branch").spec.version == 2
    assert all(b.builtin for b in listed if b.spec.name in BUILTIN_BLUEPRINTS)
    counts = store.counts()
    assert counts["blueprints"] == len(BUILTIN_BLUEPRINTS) + 1
    assert counts["blueprint_versions"] == len(BUILTIN_BLUEPRINTS) + 2


def test_builtin_cannot_be_replaced_at_its_version(store: KernelStore) -> None:
    builtin = BUILTIN_BLUEPRINTS["low_rank"]
    stored, created = store.put_blueprint(builtin, builtin=True)
    assert created and stored.builtin
    assert store.put_blueprint(builtin, builtin=True) == (stored, False)
    # The identical spec sent by a user is the same blueprint, and stays built in.
    assert store.put_blueprint(builtin) == (stored, False)
    hijack = builtin.model_copy(update={"description": "mine now"})
    with pytest.raises(ConfigError, match="built in and cannot be replaced"):
        store.put_blueprint(hijack)
    newer, created = store.put_blueprint(hijack.model_copy(update={"version": builtin.version + 1}))
    assert created and not newer.builtin
    assert store.get_blueprint("low_rank", builtin.version).builtin


def test_stored_blueprint_round_trips_as_json(store: KernelStore) -> None:
    stored, _ = store.put_blueprint(BUILTIN_BLUEPRINTS["residual_mlp"], builtin=True)
    assert StoredBlueprint.model_validate_json(stored.model_dump_json()) == stored


# ------------------------------------------------------------------------------------- kernels
def test_put_and_get_kernel(store: KernelStore, artifact: KernelArtifact) -> None:
    kid = artifact.meta.kernel_id
    assert not store.has_kernel(kid)
    meta, created = store.put_kernel(artifact, tags=["lr-8x8"])
    assert created and meta == artifact.meta
    assert store.has_kernel(kid)
    assert store.get_kernel(kid) == artifact.meta
    assert store.get_kernel("lr-8x8") == artifact.meta
    assert store.tags_of(kid) == ["lr-8x8"]
    assert blob_of(store, artifact).read_bytes() == artifact.data
    got = store.read_artifact(kid)
    assert got.meta == artifact.meta and got.data == artifact.data


def test_same_kernel_again_is_idempotent(store: KernelStore, artifact: KernelArtifact) -> None:
    first, _ = store.put_kernel(artifact)
    later = KernelArtifact(
        artifact.meta.model_copy(update={"created_at": artifact.meta.created_at + 50}),
        artifact.data,
    )
    again, created = store.put_kernel(later, tags=["added-later"])
    assert not created
    assert again == first  # the stored record, not the resent one
    assert store.get_kernel("added-later") == first
    assert store.counts()["kernels"] == 1


def test_conflicting_digest_is_refused_and_changes_nothing(
    store: KernelStore, artifact: KernelArtifact
) -> None:
    store.put_kernel(artifact, tags=["stable"])
    before = store.counts()
    blobs_before = sorted(p.name for p in store.blobs.iterdir())
    with pytest.raises(ConfigError, match="already exists with digest"):
        store.put_kernel(other_bytes(artifact), tags=["stable", "fresh"])
    assert store.counts() == before
    assert sorted(p.name for p in store.blobs.iterdir()) == blobs_before
    assert store.get_kernel(artifact.meta.kernel_id).digest == artifact.meta.digest
    with pytest.raises(UnknownKernelError):
        store.get_kernel("fresh")


def test_bytes_not_matching_their_digest_are_refused(
    store: KernelStore, artifact: KernelArtifact
) -> None:
    with pytest.raises(DigestMismatchError):
        store.put_kernel(KernelArtifact(artifact.meta, artifact.data[:-1]))
    assert store.counts()["kernels"] == 0
    assert list(store.blobs.iterdir()) == []


def test_unknown_kernel(store: KernelStore) -> None:
    for ref in ("krn_" + "0" * 24, "no-such-tag"):
        with pytest.raises(UnknownKernelError, match=ref):
            store.get_kernel(ref)
    with pytest.raises(UnknownKernelError):
        store.read_artifact("krn_" + "0" * 24)


# ---------------------------------------------------------------------------------------- tags
def test_tag_moves_between_kernels(store: KernelStore, artifact: KernelArtifact) -> None:
    a, b = variant(artifact, 1), variant(artifact, 2)
    store.put_kernel(a, tags=["prod"])
    store.put_kernel(b)
    store.set_tag("prod", b.meta.kernel_id)
    assert store.get_kernel("prod").kernel_id == b.meta.kernel_id
    assert store.tags_of(a.meta.kernel_id) == []
    assert store.tags_of(b.meta.kernel_id) == ["prod"]
    store.delete_tag("prod")
    with pytest.raises(UnknownKernelError):
        store.get_kernel("prod")
    with pytest.raises(UnknownKernelError, match="unknown tag"):
        store.delete_tag("prod")
    assert store.has_kernel(b.meta.kernel_id)  # the kernel outlives its tag


def test_tag_on_unknown_kernel(store: KernelStore) -> None:
    with pytest.raises(UnknownKernelError, match="cannot tag"):
        store.set_tag("prod", "krn_" + "f" * 24)


@pytest.mark.parametrize(
    "tag", ["", "-leading-dash", "has space", "a/b", "ünï", "x" * 129, "krn_" + "a" * 24]
)
def test_bad_tags_are_refused(store: KernelStore, artifact: KernelArtifact, tag: str) -> None:
    with pytest.raises(ConfigError, match="must not look like a kernel id"):
        store.put_kernel(artifact, tags=[tag])
    assert store.counts()["kernels"] == 0  # refused before anything was written
    store.put_kernel(artifact)
    with pytest.raises(ConfigError):
        store.set_tag(tag, artifact.meta.kernel_id)


def test_good_tags(store: KernelStore, artifact: KernelArtifact) -> None:
    tags = ["efficiency_kernel_v1", "v1.2.3", "A-b_c.d", "x" * 128, "krn_short"]
    store.put_kernel(artifact, tags=tags)
    assert store.tags_of(artifact.meta.kernel_id) == sorted(tags)


# ------------------------------------------------------------------------------------- listing
@pytest.fixture
def five(store: KernelStore, artifact: KernelArtifact) -> list[KernelArtifact]:
    kernels = [
        variant(artifact, i, name=f"k{i % 2}", blueprint="low_rank" if i < 3 else "bottleneck")
        for i in range(5)
    ]
    for k in kernels:
        store.put_kernel(k)
    store.set_tag("best", kernels[3].meta.kernel_id)
    return kernels


def ids(metas: list[Any]) -> list[str]:
    return [m.kernel_id for m in metas]


def test_list_newest_first_with_filters(store: KernelStore, five: list[KernelArtifact]) -> None:
    newest_first = [k.meta.kernel_id for k in reversed(five)]
    assert ids(store.list_kernels()[0]) == newest_first
    assert store.list_kernels()[1] is None
    assert ids(store.list_kernels(name="k0")[0]) == newest_first[0::2]
    assert ids(store.list_kernels(blueprint="bottleneck")[0]) == newest_first[:2]
    assert ids(store.list_kernels(blueprint="low_rank", name="k1")[0]) == [five[1].meta.kernel_id]
    assert ids(store.list_kernels(tag="best")[0]) == [five[3].meta.kernel_id]
    assert store.list_kernels(tag="best", name="k0") == ([], None)
    assert store.list_kernels(name="nobody") == ([], None)


def test_pagination_walks_every_kernel_once(
    store: KernelStore, artifact: KernelArtifact, five: list[KernelArtifact]
) -> None:
    # Two more with a creation time equal to an existing one: the kernel id breaks the tie.
    twins = [variant(artifact, 100 + i, created_at=five[2].meta.created_at) for i in range(2)]
    for k in twins:
        store.put_kernel(k)
    everything = ids(store.list_kernels()[0])
    assert len(everything) == 7
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list_kernels(limit=2, cursor=cursor)
        pages.append(ids(page))
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert [kid for p in pages for kid in p] == everything
    # An exact multiple of the limit ends without an empty extra page.
    page, cursor = store.list_kernels(name="k1", limit=2)
    assert len(page) == 2 and cursor is None


def test_bad_cursor_and_limit(store: KernelStore, five: list[KernelArtifact]) -> None:
    bad = [
        "not base64 at all!",
        base64.urlsafe_b64encode(b"{}").decode(),
        base64.urlsafe_b64encode(b'[1.0, "not-a-kernel"]').decode(),
        base64.urlsafe_b64encode(b'["x", "krn_' + b"0" * 24 + b'"]').decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ]
    for cursor in bad:
        with pytest.raises(ConfigError, match="invalid cursor"):
            store.list_kernels(cursor=cursor)
    for limit in (0, -1, 1001):
        with pytest.raises(ConfigError, match="limit"):
            store.list_kernels(limit=limit)


# ----------------------------------------------------------------------------------- integrity
def test_tampered_blob_is_never_served(store: KernelStore, artifact: KernelArtifact) -> None:
    store.put_kernel(artifact)
    blob = blob_of(store, artifact)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="hashes to"):
        store.read_artifact(artifact.meta.kernel_id)
    # Sending the kernel again rewrites the blob from the good bytes.
    assert store.put_kernel(artifact)[1] is False
    assert store.read_artifact(artifact.meta.kernel_id).data == artifact.data


def test_missing_blob_is_reported(store: KernelStore, artifact: KernelArtifact) -> None:
    store.put_kernel(artifact)
    blob_of(store, artifact).unlink()
    with pytest.raises(CorruptArtifactError, match="missing"):
        store.read_artifact(artifact.meta.kernel_id)
    assert store.get_kernel(artifact.meta.kernel_id) == artifact.meta  # metadata still there


def test_blob_bytes_counts_each_artifact_once(store: KernelStore, artifact: KernelArtifact) -> None:
    store.put_kernel(variant(artifact, 1))
    store.put_kernel(variant(artifact, 2))
    store.put_kernel(other_bytes(variant(artifact, 3)))
    counts = store.counts()
    assert counts["kernels"] == 3
    assert counts["blob_bytes"] == 2 * len(artifact.data) + 1
    assert len(list(store.blobs.iterdir())) == 2


# ------------------------------------------------------------------------------------ restarts
def test_everything_survives_a_restart(tmp_path: Path, artifact: KernelArtifact) -> None:
    root = tmp_path / "urza"
    with KernelStore(root) as first:
        bp, _ = first.put_blueprint(custom())
        first.put_kernel(artifact, tags=["keep"])
        counts = first.counts()
    with KernelStore(root) as second:
        assert second.counts() == counts
        assert second.get_blueprint("tiny_branch") == bp
        assert second.get_kernel("keep") == artifact.meta
        assert second.read_artifact(artifact.meta.kernel_id).data == artifact.data
        assert second.put_kernel(artifact)[1] is False


def test_leftover_temp_files_are_removed(tmp_path: Path, artifact: KernelArtifact) -> None:
    root = tmp_path / "urza"
    with KernelStore(root) as first:
        first.put_kernel(artifact)
    leftovers = [root / "blobs" / ".tmp-abc123", root / "blobs" / ".tmp-"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a kernel")
    with KernelStore(root) as second:
        assert not any(p.exists() for p in leftovers)
        assert [p.name for p in second.blobs.iterdir()] == [blob_of(second, artifact).name]
        assert second.read_artifact(artifact.meta.kernel_id).data == artifact.data


def test_sqlite_settings(store: KernelStore) -> None:
    # A second connection sees what the store set on the file itself.
    conn = sqlite3.connect(store.root / "urza.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "urza"
    KernelStore(root).close()
    conn = sqlite3.connect(root / "urza.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        KernelStore(root)


def test_close_twice_is_harmless(tmp_path: Path) -> None:
    s = KernelStore(tmp_path / "urza")
    s.close()
    s.close()


# ------------------------------------------------------------------------------------- threads
def test_concurrent_puts_and_gets(store: KernelStore, artifact: KernelArtifact) -> None:
    threads, per_thread = 8, 12
    # Each thread stores its own kernels plus a set every thread races to store.
    shared = [variant(artifact, 10_000 + i) for i in range(per_thread)]
    created: list[str] = []
    errors: list[BaseException] = []
    record = threading.Lock()
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            mine = [variant(artifact, t * 100 + i) for i in range(per_thread)]
            for own, common in zip(mine, shared, strict=True):
                for k in (own, common):
                    meta, was_created = store.put_kernel(k, tags=[f"t{t}-latest"])
                    if was_created:
                        with record:
                            created.append(meta.kernel_id)
                    assert store.get_kernel(k.meta.kernel_id) == k.meta
                    assert store.read_artifact(k.meta.kernel_id).data == artifact.data
                store.list_kernels(limit=5)
        except BaseException as err:
            with record:
                errors.append(err)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert sorted(created) == sorted(set(created))  # each kernel created exactly once
    assert len(created) == threads * per_thread + per_thread
    counts = store.counts()
    assert counts["kernels"] == len(created)
    assert counts["tags"] == threads
    assert counts["blob_bytes"] == len(artifact.data)

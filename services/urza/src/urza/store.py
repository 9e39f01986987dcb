"""Urza's storage: blueprint specs and kernel metadata in SQLite, kernel bytes by content.

Layout under `root`: `urza.sqlite3` (plus its WAL files) and `blobs/<sha256 hex>`. A blob is
renamed into place, fsynced, before the row that names it commits, so a crash at any point
leaves either no row or a row whose blob is complete; an orphan blob is harmless because the
name is its content. Reads re-hash the blob, so a file damaged on disk is reported, never served.

The API is synchronous; one connection serves every thread, one call at a time (SQLite work is
short; blob I/O happens outside the lock).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from esper.blueprints.spec import BlueprintSpec
from esper.contracts import KERNEL_ID_RE, KernelMeta
from esper.exceptions import (
    ConfigError,
    UnknownBlueprintError,
    UnknownKernelError,
)
from esper.files import atomic_write
from esper.kernels.artifact import KernelArtifact, verify
from esper.registry import TAG_RE
from urza import store_sql as sql
from urza.errors import (
    BlueprintConflictError,
    CorruptBlobError,
    InvalidCursorError,
    InvalidTagError,
    KernelConflictError,
    UnknownTagError,
)

MAX_LIST_LIMIT = 1000
DB_NAME = "urza.sqlite3"
BLOB_DIR = "blobs"
_TMP_PREFIX = ".tmp-"


class StoredBlueprint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: BlueprintSpec
    builtin: bool
    created_at: float
    digest: str


def spec_digest(spec: BlueprintSpec) -> str:
    """Of the canonical JSON, so key order and omitted defaults do not change the digest."""
    return "sha256:" + hashlib.sha256(_canonical(spec).encode()).hexdigest()


def check_tag(tag: str) -> None:
    """esper.registry's rule, so a tag that works in a notebook works in the service too."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or KERNEL_ID_RE.fullmatch(tag):
        raise InvalidTagError(
            f"tag {tag!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
            "starting with a letter or digit, and must not look like a kernel id"
        )


def _canonical(spec: BlueprintSpec) -> str:
    return json.dumps(spec.canonical(), sort_keys=True, separators=(",", ":"))


def _encode_cursor(meta: KernelMeta) -> str:
    raw = json.dumps([meta.created_at, meta.kernel_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, kernel_id = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        raise InvalidCursorError(f"invalid cursor {cursor!r}") from None
    if (
        isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not isinstance(kernel_id, str)
        or not KERNEL_ID_RE.fullmatch(kernel_id)
    ):
        raise InvalidCursorError(f"invalid cursor {cursor!r}")
    return float(created_at), kernel_id


class KernelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / BLOB_DIR
        self.blobs.mkdir(parents=True, exist_ok=True)
        # Left by a write that died before its rename; one process owns a root, so none of
        # these can belong to a write still in progress.
        for leftover in self.blobs.glob(_TMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.root / DB_NAME, check_same_thread=False, isolation_level=None
        )
        try:
            for pragma in sql.PRAGMAS:
                self._conn.execute(pragma)
            self._migrate()
        except BaseException:
            self._conn.close()
            raise
        self._closed = False

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > sql.SCHEMA_VERSION:
            raise ConfigError(
                f"{self.root / DB_NAME} has schema version {version}, newer than this Urza "
                f"understands ({sql.SCHEMA_VERSION}); upgrade Urza or use another directory"
            )
        if version == sql.SCHEMA_VERSION:
            return
        with self._write() as conn:
            for statement in sql.SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the checks inside see what they commit on.
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT can leave it open
                    self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._conn.close()
                self._closed = True

    def __enter__(self) -> KernelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- blueprints
    def put_blueprint(
        self, spec: BlueprintSpec, *, builtin: bool = False
    ) -> tuple[StoredBlueprint, bool]:
        """Store a spec; the same content again is a no-op, a changed one needs a new version."""
        digest = spec_digest(spec)
        label = f"blueprint {spec.name!r} version {spec.version}"
        with self._write() as conn:
            row = conn.execute(sql.SELECT_BLUEPRINT, (spec.name, spec.version)).fetchone()
            if row is not None:
                existing = self._blueprint(row)
                if existing.digest == digest:
                    if builtin and not existing.builtin:
                        conn.execute(sql.MARK_BLUEPRINT_BUILTIN, (spec.name, spec.version))
                        existing = existing.model_copy(update={"builtin": True})
                    return existing, False
                if existing.builtin and not builtin:
                    raise BlueprintConflictError(
                        f"{label} is built in and cannot be replaced; bump version"
                    )
                raise BlueprintConflictError(
                    f"{label} already exists with different content; bump version"
                )
            latest = conn.execute(sql.SELECT_LATEST_BLUEPRINT, (spec.name,)).fetchone()
            if latest is not None and latest[1] > spec.version:
                # Inserting below the latest would never be served as "latest" and would make
                # the version history say something that never happened.
                raise BlueprintConflictError(
                    f"{label} is older than the stored latest version {latest[1]}; "
                    f"use version {latest[1] + 1} or higher"
                )
            stored = StoredBlueprint(
                spec=spec, builtin=builtin, created_at=time.time(), digest=digest
            )
            conn.execute(
                sql.INSERT_BLUEPRINT,
                (spec.name, spec.version, _canonical(spec), builtin, stored.created_at, digest),
            )
            return stored, True

    def get_blueprint(self, name: str, version: int | None = None) -> StoredBlueprint:
        with self._read() as conn:
            if version is None:
                row = conn.execute(sql.SELECT_LATEST_BLUEPRINT, (name,)).fetchone()
            else:
                row = conn.execute(sql.SELECT_BLUEPRINT, (name, version)).fetchone()
        if row is None:
            which = f"blueprint {name!r}" + ("" if version is None else f" version {version}")
            raise UnknownBlueprintError(f"unknown {which}")
        return self._blueprint(row)

    def list_blueprints(self) -> list[StoredBlueprint]:
        with self._read() as conn:
            rows = conn.execute(sql.SELECT_LATEST_BLUEPRINTS).fetchall()
        return [self._blueprint(row) for row in rows]

    @staticmethod
    def _blueprint(row: tuple[Any, ...]) -> StoredBlueprint:
        _name, _version, spec, builtin, created_at, digest = row
        return StoredBlueprint(
            spec=BlueprintSpec.model_validate_json(spec),
            builtin=bool(builtin),
            created_at=created_at,
            digest=digest,
        )

    # ------------------------------------------------------------------------------ kernels
    def has_kernel(self, kernel_id: str) -> bool:
        with self._read() as conn:
            return conn.execute(sql.SELECT_KERNEL_DIGEST, (kernel_id,)).fetchone() is not None

    def put_kernel(
        self, artifact: KernelArtifact, *, tags: Sequence[str] = ()
    ) -> tuple[KernelMeta, bool]:
        """Store a kernel and point `tags` at it. The same id and bytes again returns the stored
        metadata (still applying `tags`); the same id with other bytes is a KernelConflictError."""
        verify(artifact)
        for tag in tags:
            check_tag(tag)
        meta = artifact.meta
        with self._read() as conn:
            self._check_conflict(conn, meta)  # fail before writing a blob that nobody needs
        atomic_write(self.blobs / self._blob_name(meta), artifact.data, temp_prefix=_TMP_PREFIX)
        with self._write() as conn:
            # Checked again: another thread may have stored this id since the first look.
            if self._check_conflict(conn, meta):
                row = conn.execute(sql.SELECT_KERNEL_META, (meta.kernel_id,)).fetchone()
                stored, created = KernelMeta.model_validate_json(row[0]), False
            else:
                conn.execute(
                    sql.INSERT_KERNEL,
                    (
                        meta.kernel_id,
                        meta.name,
                        meta.blueprint,
                        meta.created_at,
                        meta.digest,
                        meta.size_bytes,
                        meta.model_dump_json(),
                    ),
                )
                stored, created = meta, True
            for tag in tags:
                conn.execute(sql.UPSERT_TAG, (tag, meta.kernel_id))
        return stored, created

    @staticmethod
    def _check_conflict(conn: sqlite3.Connection, meta: KernelMeta) -> bool:
        """Whether this exact kernel is already stored; raises if its id names other bytes."""
        row = conn.execute(sql.SELECT_KERNEL_DIGEST, (meta.kernel_id,)).fetchone()
        if row is None:
            return False
        if row[0] != meta.digest:
            raise KernelConflictError(
                f"kernel {meta.kernel_id} already exists with digest {row[0]}, "
                f"not {meta.digest}; a kernel id names exactly one artifact"
            )
        return True

    def get_kernel(self, ref: str) -> KernelMeta:
        """By kernel id or by tag (a tag never looks like a kernel id, so the two cannot clash)."""
        query = sql.SELECT_KERNEL_META if KERNEL_ID_RE.fullmatch(ref) else sql.SELECT_TAGGED_META
        with self._read() as conn:
            row = conn.execute(query, (ref,)).fetchone()
        if row is None:
            raise UnknownKernelError(f"unknown kernel {ref!r}")
        return KernelMeta.model_validate_json(row[0])

    def read_artifact(self, kernel_id: str) -> KernelArtifact:
        meta = self.get_kernel(kernel_id)
        path = self.blobs / self._blob_name(meta)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptBlobError(
                f"kernel {meta.kernel_id}: its blob {path.name} is missing from the store"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if "sha256:" + actual != meta.digest or len(data) != meta.size_bytes:
            raise CorruptBlobError(
                f"kernel {meta.kernel_id}: stored blob hashes to sha256:{actual} "
                f"({len(data)} bytes), not the recorded {meta.digest} ({meta.size_bytes} bytes)"
            )
        return KernelArtifact(meta, data)

    def list_kernels(
        self,
        *,
        blueprint: str | None = None,
        name: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[KernelMeta], str | None]:
        """Newest first; pass the returned cursor back for the next page (None: no more)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ConfigError(f"limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}")
        query = sql.LIST_KERNELS
        where: list[str] = []
        params: list[str | float | int] = []
        if tag is not None:
            query += sql.LIST_JOIN_TAG
            params.append(tag)
        if blueprint is not None:
            where.append("k.blueprint = ?")
            params.append(blueprint)
        if name is not None:
            where.append("k.name = ?")
            params.append(name)
        if cursor is not None:
            created_at, kernel_id = _decode_cursor(cursor)
            where.append(sql.LIST_AFTER_CURSOR)
            params += [created_at, created_at, kernel_id]
        if where:
            query += " WHERE " + " AND ".join(where)
        # One extra row tells whether another page exists without a second query.
        query += sql.LIST_ORDER
        params.append(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        metas = [KernelMeta.model_validate_json(row[0]) for row in rows[:limit]]
        more = len(rows) > limit
        return metas, (_encode_cursor(metas[-1]) if more else None)

    @staticmethod
    def _blob_name(meta: KernelMeta) -> str:
        return meta.digest.removeprefix("sha256:")

    # --------------------------------------------------------------------------------- tags
    def tags_of(self, kernel_id: str) -> list[str]:
        with self._read() as conn:
            return [row[0] for row in conn.execute(sql.SELECT_TAGS_OF, (kernel_id,))]

    def set_tag(self, tag: str, kernel_id: str) -> None:
        """Point `tag` at `kernel_id`, moving it if it named another kernel."""
        check_tag(tag)
        with self._write() as conn:
            if conn.execute(sql.SELECT_KERNEL_DIGEST, (kernel_id,)).fetchone() is None:
                raise UnknownKernelError(f"cannot tag {tag!r}: unknown kernel {kernel_id!r}")
            conn.execute(sql.UPSERT_TAG, (tag, kernel_id))

    def delete_tag(self, tag: str) -> None:
        with self._write() as conn:
            if conn.execute(sql.DELETE_TAG, (tag,)).rowcount == 0:
                raise UnknownTagError(f"unknown tag {tag!r}")

    # ------------------------------------------------------------------------------- totals
    def counts(self) -> dict[str, int]:
        """`blob_bytes` counts each distinct artifact the metadata refers to once."""
        with self._read() as conn:
            row = conn.execute(sql.COUNTS).fetchone()
        keys = ("blueprints", "blueprint_versions", "kernels", "tags", "blob_bytes")
        return dict(zip(keys, (int(v) for v in row), strict=True))

"""The SQLite schema and statements behind `urza.store.KernelStore`.

Kept apart from the store's logic so the layout of the database reads in one place. Bump
`SCHEMA_VERSION` (and add a migration step in the store) whenever `SCHEMA` changes.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# Connection settings applied on every open. WAL lets readers proceed while a write commits;
# synchronous=FULL makes a commit durable before it returns, which the service promises to
# clients that were told "201 Created".
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)

SCHEMA = (
    """
    CREATE TABLE blueprints (
        name        TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        spec        TEXT    NOT NULL,
        builtin     INTEGER NOT NULL,
        created_at  REAL    NOT NULL,
        digest      TEXT    NOT NULL,
        PRIMARY KEY (name, version)
    )
    """,
    """
    CREATE TABLE kernels (
        kernel_id   TEXT    PRIMARY KEY,
        name        TEXT    NOT NULL,
        blueprint   TEXT,
        created_at  REAL    NOT NULL,
        digest      TEXT    NOT NULL,
        size_bytes  INTEGER NOT NULL,
        meta        TEXT    NOT NULL
    )
    """,
    # The listing order (newest first, kernel id as the tie-break) is also the cursor's order.
    "CREATE INDEX kernels_by_time ON kernels (created_at DESC, kernel_id DESC)",
    "CREATE INDEX kernels_by_name ON kernels (name, created_at DESC)",
    "CREATE INDEX kernels_by_blueprint ON kernels (blueprint, created_at DESC)",
    "CREATE INDEX kernels_by_digest ON kernels (digest)",
    """
    CREATE TABLE tags (
        tag         TEXT PRIMARY KEY,
        kernel_id   TEXT NOT NULL REFERENCES kernels (kernel_id)
    )
    """,
    "CREATE INDEX tags_by_kernel ON tags (kernel_id)",
)

# ------------------------------------------------------------------------------- blueprints
BLUEPRINT_COLUMNS = "name, version, spec, builtin, created_at, digest"
SELECT_BLUEPRINT = f"SELECT {BLUEPRINT_COLUMNS} FROM blueprints WHERE name = ? AND version = ?"
SELECT_LATEST_BLUEPRINT = (
    f"SELECT {BLUEPRINT_COLUMNS} FROM blueprints WHERE name = ? ORDER BY version DESC LIMIT 1"
)
SELECT_LATEST_BLUEPRINTS = f"""
    SELECT {", ".join("b." + c.strip() for c in BLUEPRINT_COLUMNS.split(","))}
    FROM blueprints AS b
    JOIN (SELECT name, MAX(version) AS version FROM blueprints GROUP BY name) AS latest
      ON b.name = latest.name AND b.version = latest.version
    ORDER BY b.name
"""
INSERT_BLUEPRINT = f"INSERT INTO blueprints ({BLUEPRINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
MARK_BLUEPRINT_BUILTIN = "UPDATE blueprints SET builtin = 1 WHERE name = ? AND version = ?"

# ---------------------------------------------------------------------------------- kernels
SELECT_KERNEL_META = "SELECT meta FROM kernels WHERE kernel_id = ?"
SELECT_KERNEL_DIGEST = "SELECT digest FROM kernels WHERE kernel_id = ?"
SELECT_TAGGED_META = (
    "SELECT k.meta FROM tags AS t JOIN kernels AS k ON k.kernel_id = t.kernel_id WHERE t.tag = ?"
)
INSERT_KERNEL = """
    INSERT INTO kernels (kernel_id, name, blueprint, created_at, digest, size_bytes, meta)
    VALUES (?, ?, ?, ?, ?, ?, ?)
"""
# Listing is assembled from these fragments only; every value goes in as a parameter.
LIST_KERNELS = "SELECT k.meta FROM kernels AS k"
LIST_JOIN_TAG = " JOIN tags AS t ON t.kernel_id = k.kernel_id AND t.tag = ?"
LIST_AFTER_CURSOR = "(k.created_at < ? OR (k.created_at = ? AND k.kernel_id < ?))"
LIST_ORDER = " ORDER BY k.created_at DESC, k.kernel_id DESC LIMIT ?"

# ------------------------------------------------------------------------------------- tags
SELECT_TAGS_OF = "SELECT tag FROM tags WHERE kernel_id = ? ORDER BY tag"
UPSERT_TAG = """
    INSERT INTO tags (tag, kernel_id) VALUES (?, ?)
    ON CONFLICT (tag) DO UPDATE SET kernel_id = excluded.kernel_id
"""
DELETE_TAG = "DELETE FROM tags WHERE tag = ?"

# ----------------------------------------------------------------------------------- counts
COUNTS = """
    SELECT
        (SELECT COUNT(DISTINCT name) FROM blueprints),
        (SELECT COUNT(*) FROM blueprints),
        (SELECT COUNT(*) FROM kernels),
        (SELECT COUNT(*) FROM tags),
        (SELECT COALESCE(SUM(size_bytes), 0)
           FROM (SELECT digest, MAX(size_bytes) AS size_bytes FROM kernels GROUP BY digest))
"""

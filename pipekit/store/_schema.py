"""The SQLite schema, versioned in code: ``PRAGMA user_version`` counts the migrations applied.

Append a migration to `MIGRATIONS` to change the schema; never edit one that
shipped. `migrate` applies the missing ones in one transaction when a store
opens, and refuses a database written by a newer pipekit.
"""

from __future__ import annotations

import sqlite3

from ._errors import StoreError, StoreVersionError

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "check_version", "migrate"]

#: ``PRAGMA application_id`` of pipekit run databases ("pkit").
APPLICATION_ID = 0x706B6974

_V1 = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    request_type TEXT NOT NULL DEFAULT '',
    pipeline TEXT NOT NULL,
    definition_hash TEXT,
    definition TEXT,
    source TEXT,
    input TEXT NOT NULL DEFAULT '{}',
    input_restorable INTEGER NOT NULL DEFAULT 1,
    trigger TEXT NOT NULL,
    retry_of TEXT,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    duration REAL,
    error TEXT
);
CREATE INDEX runs_by_start ON runs (started_at DESC);
CREATE INDEX runs_by_pipeline ON runs (pipeline, started_at DESC);
CREATE INDEX runs_by_status ON runs (status);
CREATE INDEX runs_by_request ON runs (request_id);
CREATE TABLE stages (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    position INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    duration REAL,
    output TEXT,
    output_restorable INTEGER NOT NULL DEFAULT 1,
    error TEXT,
    reason TEXT,
    rollback_status TEXT,
    rollback_error TEXT,
    log_tail TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, stage)
) WITHOUT ROWID
"""

#: The migrations, oldest first: migration ``n`` (1-based) brings a database to version ``n``.
#: Each is a script of ``;``-separated statements without ``;`` inside them.
MIGRATIONS: tuple[str, ...] = (_V1,)

#: The schema version this pipekit writes.
SCHEMA_VERSION = len(MIGRATIONS)


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def check_version(conn: sqlite3.Connection, path: str) -> int:
    """Return the database's schema version after checking it is a pipekit database this code can use.

    Raises:
        StoreVersionError: If a newer pipekit wrote it.
        StoreError: If it is another application's SQLite database.
    """
    version = _version(conn)
    if version > SCHEMA_VERSION:
        raise StoreVersionError(
            f"database {path} has schema version {version}, newer than this pipekit supports "
            f"({SCHEMA_VERSION}); upgrade pipekit",
            path=path,
            found=version,
            supported=SCHEMA_VERSION,
        )
    application = int(conn.execute("PRAGMA application_id").fetchone()[0])
    foreign = application not in (0, APPLICATION_ID) or (
        version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
    )
    if foreign:
        raise StoreError(
            f"database {path} is not a pipekit run database (it belongs to another application)", path=path
        )
    return version


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the database to `SCHEMA_VERSION` in one transaction; return the version it had.

    ``conn`` must be in autocommit mode (``isolation_level=None``).

    Raises:
        StoreVersionError: If a newer pipekit wrote it.
        StoreError: If it is another application's SQLite database.
        sqlite3.Error: If SQLite fails (a lock, a read-only file); nothing is changed then.
    """
    if check_version(conn, path) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = check_version(conn, path)  # another process may have migrated meanwhile
        for script in MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version

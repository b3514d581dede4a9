"""The synchronous half of `SqliteStore`: one sqlite3 connection, used from one worker thread at a time."""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import RunNotFoundError, StoreError
from ._schema import migrate
from ._state import TAGGED, TYPE_TAG
from ._values import INTERRUPTED, PipelineStats, RunPage, RunRecord, StageRecord, WriteBatch

__all__ = ["Database", "is_busy", "translate"]

#: Stages listed in `PipelineStats.flakiest`.
FLAKIEST = 5

_RUN_COLUMNS = (
    "id, request_id, request_type, pipeline, definition_hash, source, input, input_restorable, trigger, retry_of, "
    "host, pid, status, started_at, updated_at, finished_at, duration, error"
)

_UPSERT_RUN = """
INSERT INTO runs (id, request_id, request_type, pipeline, definition_hash, definition, source, input, input_restorable,
                  trigger, retry_of, host, pid, status, started_at, updated_at, finished_at, duration, error)
VALUES (:id, :request_id, :request_type, :pipeline, :definition_hash, :definition, :source, :input, :input_restorable,
        :trigger, :retry_of, :host, :pid, :status, :started_at, :updated_at, :finished_at, :duration, :error)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at, finished_at = excluded.finished_at,
    duration = excluded.duration, error = excluded.error
"""

_UPSERT_STAGE = """
INSERT INTO stages (run_id, stage, pipeline, position, status, attempts, started_at, finished_at, duration,
                    output, output_restorable, error, reason, rollback_status, rollback_error, log_tail)
VALUES (:run_id, :stage, :pipeline, :position, :status, :attempts, :started_at, :finished_at, :duration,
        :output, :output_restorable, :error, :reason, :rollback_status, :rollback_error, :log_tail)
ON CONFLICT (run_id, stage) DO UPDATE SET
    status = excluded.status, attempts = excluded.attempts, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration = excluded.duration, output = excluded.output,
    output_restorable = excluded.output_restorable, error = excluded.error, reason = excluded.reason,
    rollback_status = excluded.rollback_status, rollback_error = excluded.rollback_error,
    log_tail = excluded.log_tail
"""

# SQLite's primary result codes worth telling apart.
_BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 11, 13, 14, 26


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` means another connection holds a lock (worth retrying)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    return _code(exc) in (_BUSY, _LOCKED) or "database is locked" in str(exc)


def translate(exc: sqlite3.Error, path: str) -> StoreError:
    """A one-line `StoreError` naming the database and what SQLite said is wrong."""
    code = _code(exc)
    reason = str(exc)
    if code == _NOTADB or "file is not a database" in reason:
        message = f"{path} is not a pipekit run database (file is not a database)"
    elif code == _CORRUPT:
        message = f"database {path} is corrupt ({reason})"
    elif code == _READONLY:
        message = f"cannot write run database {path}: it is read-only"
    elif code == _FULL:
        message = f"cannot write run database {path}: the disk is full"
    elif code == _CANTOPEN:
        message = f"cannot open run database {path}: {reason}"
    else:
        message = f"run database {path}: {reason}"
    return StoreError(message, path=path)


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0 or sys.platform == "win32":  # os.kill would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _decode(text: str | None, *, revive: bool = False) -> tuple[Any, bool]:
    """The JSON value stored as ``text`` and whether it decoded (``revive``: rebuild tagged pipekit values)."""
    if text is None:
        return None, True
    try:
        return json.loads(text, object_hook=_revive if revive else None), True
    except ValueError:
        return None, False


def _revive(value: dict[str, Any]) -> Any:
    """A tagged pipekit value (a `CommandResult`) rebuilt; any other object as it is."""
    if value.get(TYPE_TAG) != "pipekit.ci.CommandResult":
        return value
    try:
        from pipekit.ci._command import CommandResult  # noqa: PLC0415 - the ci extra may be absent
    except ImportError:  # pragma: no cover - without the ci extra, the plain mapping
        return value
    fields = {name: value[name] for name in TAGGED["pipekit.ci.CommandResult"] if name in value}
    fields["args"] = tuple(fields.get("args", ()))
    try:
        return CommandResult(**fields)
    except TypeError:
        return value


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))  # nearest rank, as Engine.metrics
    return sorted_values[rank - 1]


class Database:
    """A pipekit run database: opening (migrating, recovering), writing and querying.

    Every method blocks; `SqliteStore` calls them in a worker thread, one at
    a time.
    """

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None

    # -- opening ------------------------------------------------------------------

    def connect(self) -> None:
        """Create the parent directory and connect (SQLite touches the file on first use).

        Raises:
            StoreError: If the directory cannot be created or written, or the path is a directory.
        """
        target = Path(self.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory of run database {self.path}: {exc.strerror or exc}", path=self.path
            ) from exc
        if target.is_dir():
            raise StoreError(f"cannot open run database {self.path}: it is a directory", path=self.path)
        if not target.exists() and not os.access(target.parent, os.W_OK):
            raise StoreError(
                f"cannot create run database {self.path}: directory {target.parent} is not writable", path=self.path
            )
        self.conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row

    def setup(self) -> tuple[str, ...]:
        """Configure the connection, migrate the schema, mark dead runs interrupted (if writable); return their ids.

        Safe to call again after a lock error.
        """
        conn = self._conn()
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, self.path)
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable but for the last commits on power loss
        try:
            return self.recover()
        except sqlite3.OperationalError as exc:
            if _code(exc) != _READONLY:
                raise
            return ()  # a read-only database can still be read: its dead runs stay `running` there

    def probe_write(self) -> None:
        """Take the write lock, write nothing, give the lock back (raises while locked, or if read-only).

        SQLite opens a file it may not write read-only, and even then grants
        ``BEGIN IMMEDIATE``: only a write statement tells, so one that changes
        no row is made.
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE runs SET id = id WHERE 0")
        finally:
            conn.execute("ROLLBACK")

    def recover(self) -> tuple[str, ...]:
        """Mark runs still ``running`` whose recording process (on this host) is gone as interrupted."""
        conn = self._conn()
        host, me = socket.gethostname(), os.getpid()
        rows = conn.execute("SELECT id, pid, host FROM runs WHERE status = 'running'").fetchall()
        dead = [row["id"] for row in rows if row["host"] == host and row["pid"] != me and not _alive(row["pid"])]
        if not dead:
            return ()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for run_id in dead:
                row = conn.execute("SELECT pid, updated_at FROM runs WHERE id = ?", (run_id,)).fetchone()
                conn.execute(
                    "UPDATE runs SET status = :status, finished_at = updated_at, "
                    "duration = max(updated_at - started_at, 0), error = :error WHERE id = :id AND status = 'running'",
                    {
                        "status": INTERRUPTED,
                        "id": run_id,
                        "error": f"the recording process (pid {row['pid']} on {host}) ended before the run finished",
                    },
                )
                conn.execute(
                    "UPDATE stages SET status = :status, finished_at = :end, "
                    "duration = max(:end - coalesce(started_at, :end), 0), "
                    "reason = 'interrupted: the recording process ended' "
                    "WHERE run_id = :id AND status IN ('running', 'pending')",
                    {"status": INTERRUPTED, "end": row["updated_at"], "id": run_id},
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return tuple(dead)

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise StoreError(f"run database {self.path} is closed", path=self.path)
        return self.conn

    # -- writing ------------------------------------------------------------------

    def save(self, batch: WriteBatch) -> None:
        """Upsert ``batch``'s rows in one transaction."""
        conn = self._conn()
        runs = [
            {
                "id": r.id,
                "request_id": r.request_id,
                "request_type": r.request_type,
                "pipeline": r.pipeline,
                "definition_hash": r.definition_hash,
                "definition": r.definition,
                "source": r.source,
                "input": r.input,
                "input_restorable": int(r.input_restorable),
                "trigger": r.trigger,
                "retry_of": r.retry_of,
                "host": r.host,
                "pid": r.pid,
                "status": r.status,
                "started_at": r.started_at,
                "updated_at": r.updated_at,
                "finished_at": r.finished_at,
                "duration": r.duration,
                "error": r.error,
            }
            for r in batch.runs
        ]
        stages = [
            {
                "run_id": s.run_id,
                "stage": s.stage,
                "pipeline": s.pipeline,
                "position": s.position,
                "status": s.status,
                "attempts": s.attempts,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "duration": s.duration,
                "output": s.output,
                "output_restorable": int(s.output_restorable),
                "error": s.error,
                "reason": s.reason,
                "rollback_status": s.rollback_status,
                "rollback_error": s.rollback_error,
                "log_tail": json.dumps(list(s.log_tail)),
            }
            for s in batch.stages
        ]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT_RUN, runs)
            conn.executemany(_UPSERT_STAGE, stages)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- reading ------------------------------------------------------------------

    def list_runs(
        self,
        *,
        pipeline: str | None,
        statuses: Sequence[str],
        since: float | None,
        until: float | None,
        limit: int,
        offset: int,
    ) -> RunPage:
        """One page of matching runs, newest first (see `RunStore.list_runs`)."""
        conn = self._conn()
        where, params = self._filters(pipeline, statuses, since, until)
        total = int(conn.execute(f"SELECT count(*) FROM runs{where}", params).fetchone()[0])
        rows = conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs{where} ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        return RunPage(runs=tuple(self._run(row) for row in rows), total=total, limit=limit, offset=offset)

    @staticmethod
    def _filters(
        pipeline: str | None,
        statuses: Sequence[str],
        since: float | None,
        until: float | None,
        *,
        finished: bool = False,
        table: str = "",
    ) -> tuple[str, list[Any]]:
        """A ``WHERE`` clause over the runs table (``table``: its alias and a dot) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        if pipeline is not None:
            clauses.append(f"{table}pipeline = ?")
            params.append(pipeline)
        if statuses:
            clauses.append(f"{table}status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        if finished:
            clauses.append(f"{table}status != 'running'")
        if since is not None:
            clauses.append(f"{table}started_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append(f"{table}started_at < ?")
            params.append(until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def get_run(self, run_id: str) -> RunRecord:
        """The whole record of the run ``run_id`` (an id or a unique prefix)."""
        conn = self._conn()
        wanted = run_id.strip().lower()
        if not wanted or any(c not in "0123456789abcdef" for c in wanted):
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.path}", run_id=run_id, path=self.path)
        ids = [wanted]
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (wanted,)).fetchone() is None:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 4", (wanted, wanted + "g")
                )
            ]
        if not ids:
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.path}", run_id=run_id, path=self.path)
        if len(ids) > 1:
            shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
            raise RunNotFoundError(
                f"run id prefix {run_id!r} is ambiguous: it matches several runs ({shown}); give more characters",
                run_id=run_id,
                matches=ids[:3],
                path=self.path,
            )
        row = conn.execute(f"SELECT {_RUN_COLUMNS}, definition FROM runs WHERE id = ?", (ids[0],)).fetchone()
        stages = conn.execute("SELECT * FROM stages WHERE run_id = ? ORDER BY position", (ids[0],)).fetchall()
        return self._run(row, definition=row["definition"], stages=tuple(self._stage(s) for s in stages))

    @staticmethod
    def _run(row: sqlite3.Row, *, definition: str | None = None, stages: tuple[StageRecord, ...] = ()) -> RunRecord:
        value, decoded = _decode(row["input"])
        started_at = _time(row["started_at"])
        assert started_at is not None
        return RunRecord(
            id=row["id"],
            request_id=row["request_id"],
            request_type=row["request_type"],
            pipeline=row["pipeline"],
            definition_hash=row["definition_hash"],
            definition=definition,
            source=row["source"],
            input=value if isinstance(value, dict) else {},
            input_restorable=bool(row["input_restorable"]) and decoded and isinstance(value, dict),
            trigger=row["trigger"],
            status=row["status"],
            started_at=started_at,
            finished_at=_time(row["finished_at"]),
            duration=row["duration"],
            error=row["error"],
            retry_of=row["retry_of"],
            host=row["host"],
            pid=row["pid"],
            stages=stages,
        )

    @staticmethod
    def _stage(row: sqlite3.Row) -> StageRecord:
        output, decoded = _decode(row["output"], revive=True)
        tail, tail_decoded = _decode(row["log_tail"])
        return StageRecord(
            stage=row["stage"],
            pipeline=row["pipeline"],
            status=row["status"],
            attempts=row["attempts"],
            started_at=_time(row["started_at"]),
            finished_at=_time(row["finished_at"]),
            duration=row["duration"],
            output=output,
            output_restorable=bool(row["output_restorable"]) and decoded,
            error=row["error"],
            reason=row["reason"],
            rollback_status=row["rollback_status"],
            rollback_error=row["rollback_error"],
            log_tail=tuple(str(line) for line in tail) if tail_decoded and isinstance(tail, list) else (),
        )

    def stats(self, pipeline: str | None, since: float | None) -> list[PipelineStats]:
        """Statistics of finished runs per pipeline (see `RunStore.stats`)."""
        conn = self._conn()
        where, params = self._filters(pipeline, (), since, None, finished=True)
        durations: defaultdict[str, list[float]] = defaultdict(list)
        counts: dict[str, list[int]] = {}
        last: dict[str, float] = {}
        for row in conn.execute(f"SELECT pipeline, status, duration, started_at FROM runs{where}", params):
            name = row["pipeline"]
            tally = counts.setdefault(name, [0, 0])
            tally[0] += 1
            tally[1] += row["status"] == "succeeded"
            if row["duration"] is not None:
                durations[name].append(float(row["duration"]))
            last[name] = max(last.get(name, row["started_at"]), row["started_at"])
        flaky: defaultdict[str, list[tuple[str, int]]] = defaultdict(list)
        run_where, _ = self._filters(pipeline, (), since, None, finished=True, table="r.")
        for row in conn.execute(
            "SELECT r.pipeline AS pipeline, s.stage AS stage, sum(s.attempts - 1) AS retries "
            f"FROM stages AS s JOIN runs AS r ON r.id = s.run_id{run_where} AND s.attempts > 1 "
            "GROUP BY r.pipeline, s.stage ORDER BY retries DESC, s.stage",
            params,
        ):
            if len(flaky[row["pipeline"]]) < FLAKIEST:
                flaky[row["pipeline"]].append((row["stage"], int(row["retries"])))
        result = []
        for name in sorted(counts):
            runs, succeeded = counts[name]
            spread = sorted(durations[name])
            result.append(
                PipelineStats(
                    pipeline=name,
                    runs=runs,
                    succeeded=succeeded,
                    failed=runs - succeeded,
                    success_rate=succeeded / runs,
                    mean_duration=sum(spread) / len(spread) if spread else None,
                    p50_duration=_percentile(spread, 50) if spread else None,
                    p95_duration=_percentile(spread, 95) if spread else None,
                    flakiest=tuple(flaky[name]),
                    last_started_at=_time(last[name]),
                )
            )
        return result

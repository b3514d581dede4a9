"""The SQLite run store: opening, schema versions, locking, bad files, queries and crash recovery."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import sys
import types
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

import pipekit as pk
import pipekit.store as store_module
from pipekit.store import (
    SCHEMA_VERSION,
    PipelineStats,
    RunNotFoundError,
    RunRow,
    RunStore,
    SqliteStore,
    StageRow,
    StoreError,
    StoreLockedError,
    StoreVersionError,
    WriteBatch,
    _schema,
    open_store,
)


def run_row(run_id: str, **fields: Any) -> RunRow:
    """A run row with sensible defaults for the fields a test does not care about."""
    values: dict[str, Any] = {
        "id": run_id,
        "request_id": f"req-{run_id}",
        "request_type": "",
        "pipeline": "build",
        "definition_hash": None,
        "definition": None,
        "input": "{}",
        "input_restorable": True,
        "trigger": "api",
        "retry_of": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "status": "succeeded",
        "started_at": 1_000.0,
        "updated_at": 1_001.0,
        "finished_at": 1_001.0,
        "duration": 1.0,
    }
    values.update(fields)
    return RunRow(**values)


def stage_row(run_id: str, stage: str, **fields: Any) -> StageRow:
    """A stage row with defaults."""
    values: dict[str, Any] = {"run_id": run_id, "stage": stage, "pipeline": "build", "position": 0}
    values.update({"status": "succeeded", "attempts": 1})
    values.update(fields)
    return StageRow(**values)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / ".pipekit" / "pipekit.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(db_path) as opened:
        yield opened


_connect = sqlite3.connect


def read_only_connect(path: str, **kwargs: Any) -> sqlite3.Connection:
    """`sqlite3.connect` as SQLite opens a file it may not write (no write permission): read-only."""
    connection: sqlite3.Connection = _connect(f"file:{path}?mode=ro", uri=True, **kwargs)
    return connection


async def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    async with await anyio.open_process([sys.executable, "-c", "pass"]) as process:
        await process.wait()
    return process.pid


class TestOpening:
    async def test_creates_directory_and_schema(self, db_path: Path) -> None:
        """Opening creates the parent directory, the file, the current schema, in WAL mode."""
        async with SqliteStore(db_path) as store:
            assert isinstance(store, RunStore)
            assert store.path == str(db_path)
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
        assert tables == {"runs", "stages"}

    async def test_default_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a path the store lives in .pipekit/pipekit.db under the working directory."""
        monkeypatch.chdir(tmp_path)
        async with open_store() as store:
            await store.save(WriteBatch(runs=(run_row("aa"),)))
        assert (tmp_path / ".pipekit" / "pipekit.db").is_file()

    async def test_reopening_keeps_runs(self, db_path: Path) -> None:
        """Runs written before are there after reopening."""
        async with SqliteStore(db_path) as store:
            await store.save(WriteBatch(runs=(run_row("aa"),), stages=(stage_row("aa", "x"),)))
        async with SqliteStore(db_path) as store:
            record = await store.get_run("aa")
        assert [s.stage for s in record.stages] == ["x"]

    async def test_newer_schema_version_is_refused(self, db_path: Path) -> None:
        """A database from a newer pipekit gets a one-line error naming both versions, and is left alone."""
        async with SqliteStore(db_path) as store:
            await store.save(WriteBatch(runs=(run_row("aa"),)))
        conn = sqlite3.connect(db_path)
        conn.execute("PRAGMA user_version = 9")
        conn.close()
        with pytest.raises(StoreVersionError) as caught:
            async with SqliteStore(db_path):
                pass
        assert str(caught.value) == (
            f"database {db_path} has schema version 9, newer than this pipekit supports ({SCHEMA_VERSION}); "
            "upgrade pipekit"
        )
        assert (caught.value.found, caught.value.supported) == (9, SCHEMA_VERSION)
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 9
        finally:
            conn.close()

    async def test_garbage_file_is_refused(self, db_path: Path) -> None:
        """A file that is not a database gets a one-line StoreError and is not modified."""
        db_path.parent.mkdir()
        garbage = b"this is not a database, it is a shopping list\n" * 100
        await anyio.Path(db_path).write_bytes(garbage)
        with pytest.raises(StoreError) as caught:
            async with SqliteStore(db_path):
                pass
        assert str(caught.value) == f"{db_path} is not a pipekit run database (file is not a database)"
        assert "\n" not in str(caught.value)
        assert await anyio.Path(db_path).read_bytes() == garbage

    async def test_other_applications_database_is_refused(self, db_path: Path) -> None:
        """A SQLite database of another application is not taken over."""
        db_path.parent.mkdir()
        conn = sqlite3.connect(db_path)
        conn.execute("CREATE TABLE invoices (id INTEGER)")
        conn.commit()
        conn.close()
        with pytest.raises(StoreError, match="is not a pipekit run database"):
            async with SqliteStore(db_path):
                pass
        conn = sqlite3.connect(db_path)
        try:
            names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        finally:
            conn.close()
        assert names == ["invoices"]

    async def test_unwritable_directory(self, tmp_path: Path) -> None:
        """A directory the database cannot be created in gets a one-line StoreError."""
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        # Opened in a child process; as root, one without the capabilities that
        # bypass file permissions (root could write into the directory).
        script = (
            "import anyio\nfrom pipekit.store import SqliteStore, StoreError\n"
            "async def main():\n"
            "    try:\n"
            f"        async with SqliteStore({str(locked / 'pipekit.db')!r}): pass\n"
            "    except StoreError as exc: print(exc)\n"
            "anyio.run(main)\n"
        )
        command = [sys.executable, "-c", script]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:  # pragma: no cover - util-linux is on every Linux this runs on
                pytest.skip("as root, dropping the capabilities that bypass permissions needs setpriv")
            command = [setpriv, "--bounding-set=-all", "--inh-caps=-all", *command]
        try:
            done = await anyio.run_process(command, check=False)
        finally:
            locked.chmod(0o700)
        assert done.stdout.decode() == (
            f"cannot create run database {locked / 'pipekit.db'}: directory {locked} is not writable\n"
        )
        assert not (locked / "pipekit.db").exists()

    async def test_parent_is_a_file(self, tmp_path: Path) -> None:
        """A path whose directory cannot be created gets a one-line StoreError."""
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "pipekit.db"
        with pytest.raises(StoreError, match=r"^cannot create the directory of run database .*pipekit\.db: ") as caught:
            async with SqliteStore(path):
                pass
        assert caught.value.path == str(path)

    async def test_path_is_a_directory(self, tmp_path: Path) -> None:
        """A directory where the file should be gets a one-line StoreError."""
        with pytest.raises(StoreError, match=r"it is a directory$"):
            async with SqliteStore(tmp_path):
                pass

    async def test_failed_migration_changes_nothing(self, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Migrations run in one transaction: when one fails, none is applied."""
        monkeypatch.setattr(_schema, "MIGRATIONS", (_schema.MIGRATIONS[0] + ";CREATE TABLE runs (x)",))
        with pytest.raises(StoreError, match="table runs already exists"):
            async with SqliteStore(db_path):
                pass
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        finally:
            conn.close()

    async def test_used_outside_its_block(self, db_path: Path) -> None:
        """Queries before opening or after closing raise StoreError; opening twice is refused."""
        store = SqliteStore(db_path)
        with pytest.raises(StoreError, match="is not open"):
            await store.list_runs()
        async with store:
            with pytest.raises(RuntimeError, match="opened only once"):
                await store.open()
        with pytest.raises(StoreError, match="is not open"):
            await store.get_run("aa")
        await store.aclose()  # closing again is harmless

    def test_bad_options(self) -> None:
        """Nonsense options are refused when the store is made."""
        with pytest.raises(ValueError, match="lock_attempts"):
            SqliteStore(lock_attempts=0)
        with pytest.raises(ValueError, match="busy_timeout"):
            SqliteStore(busy_timeout=-1)


class TestLocking:
    async def test_locked_database_is_retried_then_reported(self, db_path: Path) -> None:
        """A write lock held by another process: retried with back-off, then one line; nothing written."""
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        async with SqliteStore(db_path, busy_timeout=0, lock_attempts=4, sleep=sleep) as store:
            holder = sqlite3.connect(db_path, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StoreLockedError) as caught:
                    await store.save(WriteBatch(runs=(run_row("aa"),)))
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert (await store.list_runs()).total == 0
        assert str(caught.value) == (
            f"database {db_path} is locked by another process (gave up after 4 attempts); "
            "try again when it has finished"
        )
        assert caught.value.attempts == 4
        assert len(sleeps) == 3
        assert sleeps == sorted(sleeps)  # backing off

    async def test_lock_released_between_retries(self, db_path: Path) -> None:
        """When the other process lets go during the back-off, the write succeeds."""
        async with SqliteStore(db_path):
            pass  # the database exists, in WAL mode: a write lock does not block reading it
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        released: list[float] = []

        async def release(seconds: float) -> None:
            released.append(seconds)
            holder.execute("ROLLBACK")

        try:
            async with SqliteStore(db_path, busy_timeout=0, lock_attempts=4, sleep=release) as store:
                await store.save(WriteBatch(runs=(run_row("aa"),)))
                assert (await store.get_run("aa")).status == "succeeded"
        finally:
            holder.close()
        assert len(released) == 1

    async def test_opening_a_locked_database(self, db_path: Path) -> None:
        """A database locked while it still needs its schema cannot be opened: StoreLockedError."""
        db_path.parent.mkdir()
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")

        async def no_wait(seconds: float) -> None:
            pass

        try:
            with pytest.raises(StoreLockedError, match="is locked by another process"):
                async with SqliteStore(db_path, busy_timeout=0, lock_attempts=2, sleep=no_wait):
                    pass
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        async with SqliteStore(db_path) as store:  # usable once the lock is gone
            assert (await store.list_runs()).total == 0


class TestCheckWritable:
    async def test_writable_database(self, store: SqliteStore) -> None:
        """A database that can be written passes, and nothing is written by the check."""
        await store.check_writable()
        assert (await store.list_runs()).total == 0

    async def test_read_only_database(self, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A database SQLite can only open read-only: readable, but check_writable refuses it in one line."""
        async with SqliteStore(db_path) as store:
            await store.save(WriteBatch(runs=(run_row("aa"),)))
        monkeypatch.setattr(sqlite3, "connect", read_only_connect)
        async with SqliteStore(db_path) as store:
            assert (await store.list_runs()).total == 1
            with pytest.raises(StoreError) as caught:
                await store.check_writable()
        assert str(caught.value) == f"cannot write run database {db_path}: it is read-only"


class TestWriting:
    async def test_batch_is_all_or_nothing(self, store: SqliteStore) -> None:
        """A batch with one bad row writes none of its rows."""
        bad = WriteBatch(runs=(run_row("aa"),), stages=(stage_row("ff", "orphan"),))  # no run "ff"
        with pytest.raises(StoreError, match="FOREIGN KEY constraint failed"):
            await store.save(bad)
        assert (await store.list_runs()).total == 0

    async def test_rows_are_upserted(self, store: SqliteStore) -> None:
        """Writing a run again updates its state, keeping what never changes."""
        await store.save(WriteBatch(runs=(run_row("aa", status="running", finished_at=None, duration=None),)))
        await store.save(
            WriteBatch(
                runs=(run_row("aa", status="failed", error="boom", pipeline="ignored"),),
                stages=(stage_row("aa", "x", status="failed", attempts=3),),
            )
        )
        record = await store.get_run("aa")
        assert (record.status, record.error, record.pipeline, record.duration) == ("failed", "boom", "build", 1.0)
        assert (record.stage("x").status, record.stage("x").attempts, record.stage("x").retries) == ("failed", 3, 2)

    async def test_empty_batch_is_a_no_op(self, store: SqliteStore) -> None:
        """An empty batch writes nothing and raises nothing."""
        await store.save(WriteBatch())
        assert (await store.list_runs()).total == 0


class TestListing:
    @pytest.fixture
    async def filled(self, store: SqliteStore) -> SqliteStore:
        rows = [
            run_row(f"{i:02x}", pipeline="build" if i % 2 else "deploy", status="failed" if i % 3 == 0 else "succeeded")
            for i in range(10)
        ]
        rows = [
            run_row(r.id, pipeline=r.pipeline, status=r.status, started_at=1_000.0 + i, updated_at=1_001.0 + i)
            for i, r in enumerate(rows)
        ]
        await store.save(WriteBatch(runs=tuple(rows)))
        return store

    async def test_newest_first_with_total(self, filled: SqliteStore) -> None:
        """Runs come newest first; total counts every match."""
        page = await filled.list_runs()
        assert [r.id for r in page.runs] == [f"{i:02x}" for i in reversed(range(10))]
        assert (page.total, page.limit, page.offset, page.next_offset) == (10, 50, 0, None)
        assert all(r.stages == () and r.definition is None for r in page.runs)

    async def test_pagination(self, filled: SqliteStore) -> None:
        """Limit and offset page through the runs; next_offset points at the next page."""
        first = await filled.list_runs(limit=4)
        second = await filled.list_runs(limit=4, offset=first.next_offset or 0)
        last = await filled.list_runs(limit=4, offset=second.next_offset or 0)
        assert [len(p.runs) for p in (first, second, last)] == [4, 4, 2]
        assert (first.next_offset, second.next_offset, last.next_offset) == (4, 8, None)
        ids = [r.id for p in (first, second, last) for r in p.runs]
        assert len(set(ids)) == 10

    async def test_filters(self, filled: SqliteStore) -> None:
        """Pipeline, status (one or several) and time range filters combine."""
        builds = await filled.list_runs(pipeline="build")
        assert {r.pipeline for r in builds.runs} == {"build"}
        assert builds.total == 5
        failed = await filled.list_runs(status=pk.Status.FAILED)
        assert sorted(r.id for r in failed.runs) == ["00", "03", "06", "09"]
        both = await filled.list_runs(status=["failed", "succeeded"], pipeline="deploy")
        assert both.total == 5
        window = await filled.list_runs(since=1_002.0, until=datetime.fromtimestamp(1_005.0, UTC))
        assert [r.id for r in window.runs] == ["04", "03", "02"]
        assert (await filled.list_runs(pipeline="nothing")).total == 0

    async def test_bad_arguments(self, store: SqliteStore) -> None:
        """Unknown statuses, bad pages and times are refused naming the problem."""
        with pytest.raises(ValueError, match="unknown run status 'faild'; expected one of cancelled, failed"):
            await store.list_runs(status="faild")
        with pytest.raises(ValueError, match="limit must be an integer >= 1"):
            await store.list_runs(limit=0)
        with pytest.raises(ValueError, match="offset must be an integer >= 0"):
            await store.list_runs(offset=-1)
        with pytest.raises(TypeError, match="since must be a datetime"):
            await store.list_runs(since="yesterday")  # type: ignore[arg-type]


class TestGetRun:
    async def test_by_id_and_prefix(self, store: SqliteStore) -> None:
        """A run is found by its whole id or a unique prefix, in any case."""
        await store.save(WriteBatch(runs=(run_row("abc123"), run_row("abd456"))))
        assert (await store.get_run("abc123")).id == "abc123"
        assert (await store.get_run("ABD")).id == "abd456"
        assert (await store.get_run(" abc1 ")).id == "abc123"

    async def test_ambiguous_prefix(self, store: SqliteStore) -> None:
        """A prefix matching several runs is refused, listing some of them."""
        await store.save(WriteBatch(runs=tuple(run_row(f"ab{i}") for i in range(5))))
        with pytest.raises(RunNotFoundError) as caught:
            await store.get_run("ab")
        assert str(caught.value) == (
            "run id prefix 'ab' is ambiguous: it matches several runs (ab0, ab1, ab2, ...); give more characters"
        )
        assert caught.value.matches == ("ab0", "ab1", "ab2")

    @pytest.mark.parametrize("wanted", ["ffff", "", "not-hex", "ab%"])
    async def test_unknown(self, store: SqliteStore, db_path: Path, wanted: str) -> None:
        """An id (or prefix) matching nothing raises RunNotFoundError, also a LookupError."""
        await store.save(WriteBatch(runs=(run_row("ab0"),)))
        with pytest.raises(LookupError) as caught:
            await store.get_run(wanted)
        assert isinstance(caught.value, RunNotFoundError)
        assert str(caught.value) == f"no run with id {wanted!r} in {db_path}"

    async def test_whole_record(self, store: SqliteStore) -> None:
        """get_run decodes input, outputs and log tails, and orders stages by position."""
        await store.save(
            WriteBatch(
                runs=(run_row("aa", input='{"v": [1, 2]}', definition="stages: []", definition_hash="h"),),
                stages=(
                    stage_row("aa", "second", position=1, output='{"k": null}', log_tail=("one", "two")),
                    stage_row("aa", "first", position=0, output=None, output_restorable=False),
                ),
            )
        )
        record = await store.get_run("aa")
        assert record.input == {"v": [1, 2]}
        assert record.definition == "stages: []"
        assert [s.stage for s in record.stages] == ["first", "second"]
        assert record.stage("second").output == {"k": None}
        assert record.stage("second").log_tail == ("one", "two")
        assert record.stage("first").output_restorable is False
        with pytest.raises(KeyError, match="has no stage 'third'"):
            record.stage("third")

    async def test_type_checked(self, store: SqliteStore) -> None:
        """A run id that is not a string is a TypeError."""
        with pytest.raises(TypeError, match="takes a run id string"):
            await store.get_run(12)  # type: ignore[arg-type]


class TestStats:
    async def test_rates_percentiles_and_flakiest(self, store: SqliteStore) -> None:
        """Success rate, mean/p50/p95 durations and the most retried stages, per pipeline."""
        runs = [
            run_row(
                f"{i:02x}",
                duration=float(i),
                status="succeeded" if i <= 15 else "failed",
                started_at=1_000.0 + i,
            )
            for i in range(1, 21)
        ]
        runs.append(run_row("ff", status="running", duration=None, started_at=5_000.0))  # not counted
        runs.append(run_row("ee", pipeline="deploy", status="interrupted", duration=3.0))
        stages = [stage_row(f"{i:02x}", "push", attempts=3) for i in range(1, 4)]
        stages += [stage_row(f"{i:02x}", "test", attempts=2, position=1) for i in range(1, 3)]
        stages += [stage_row("04", "lint", attempts=1, position=2)]
        stages += [stage_row("ff", "push", attempts=9)]  # a running run's retries are not counted
        await store.save(WriteBatch(runs=tuple(runs), stages=tuple(stages)))
        build, deploy = await store.stats()
        assert build == PipelineStats(
            pipeline="build",
            runs=20,
            succeeded=15,
            failed=5,
            success_rate=0.75,
            mean_duration=10.5,
            p50_duration=10.0,
            p95_duration=19.0,
            flakiest=(("push", 6), ("test", 2)),
            last_started_at=datetime.fromtimestamp(1_020.0, UTC),
        )
        assert (deploy.pipeline, deploy.runs, deploy.failed, deploy.success_rate) == ("deploy", 1, 1, 0.0)

    async def test_filters(self, store: SqliteStore) -> None:
        """stats(pipeline=...) keeps one pipeline; since= drops older runs."""
        await store.save(
            WriteBatch(runs=(run_row("a1", started_at=10.0), run_row("a2", pipeline="other", started_at=20.0)))
        )
        assert [s.pipeline for s in await store.stats(pipeline="other")] == ["other"]
        assert [s.pipeline for s in await store.stats(since=15.0)] == ["other"]
        assert await store.stats(pipeline="none") == []


class TestInterruptedRuns:
    async def test_dead_process_runs_are_marked_interrupted(self, db_path: Path) -> None:
        """A run left running by a process that is gone is marked interrupted on the next open."""
        dead = await _dead_pid()
        async with SqliteStore(db_path) as store:
            await store.save(
                WriteBatch(
                    runs=(
                        run_row("aa", status="running", pid=dead, updated_at=1_007.5, finished_at=None, duration=None),
                        run_row("bb", status="running", finished_at=None, duration=None),  # this process: alive
                        run_row("cc", status="running", host="elsewhere", pid=dead, finished_at=None),
                    ),
                    stages=(
                        stage_row("aa", "done", status="succeeded", started_at=1_000.0, finished_at=1_002.0),
                        stage_row("aa", "busy", status="running", position=1, started_at=1_003.0),
                    ),
                )
            )
        async with SqliteStore(db_path) as store:
            assert store.recovered == ("aa",)
            record = await store.get_run("aa")
            others = {r.id: r.status for r in (await store.list_runs()).runs}
        assert record.status == "interrupted"
        assert record.finished_at == datetime.fromtimestamp(1_007.5, UTC)
        assert record.duration == pytest.approx(7.5)
        assert (
            record.error
            == f"the recording process (pid {dead} on {socket.gethostname()}) ended before the run finished"
        )
        assert record.stage("done").status == "succeeded"
        busy = record.stage("busy")
        assert (busy.status, busy.reason) == ("interrupted", "interrupted: the recording process ended")
        assert busy.duration == pytest.approx(4.5)
        assert others == {"aa": "interrupted", "bb": "running", "cc": "running"}

    async def test_read_only_database_is_read_as_it_is(self, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A database that cannot be written opens for reading; its dead runs stay running (marked when writable)."""
        dead = await _dead_pid()
        async with SqliteStore(db_path) as store:
            await store.save(WriteBatch(runs=(run_row("aa", status="running", pid=dead, finished_at=None),)))
        monkeypatch.setattr(sqlite3, "connect", read_only_connect)
        async with SqliteStore(db_path) as store:
            assert store.recovered == ()
            assert (await store.get_run("aa")).status == "running"
        monkeypatch.undo()
        async with SqliteStore(db_path) as store:
            assert store.recovered == ("aa",)


ROOT = Path(__file__).resolve().parent.parent
CRASHING_RECORDER = """
import functools, sys
import anyio
import pipekit as pk
from pipekit.store import RunRecorder, SqliteStore
from pipekit.testing import MockStage

async def main() -> None:
    hang = MockStage("hang", block=True)
    pipeline = pk.Pipeline("crashy").add_stage(MockStage("first", output=1)).add_stage(hang)
    async with SqliteStore(sys.argv[1]) as store, RunRecorder(store) as recorder, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(pipeline.execute, hooks=[recorder]))
        await hang.wait_started()
        await recorder.flush()
        print("RUN", recorder.last_run_id, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


class TestCrash:
    async def test_killed_recorder_leaves_an_interrupted_run(self, db_path: Path) -> None:
        """A recording process killed mid-run leaves a sound database; reopening marks the run interrupted."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-c", CRASHING_RECORDER, str(db_path)]
        async with await anyio.open_process(command, env=env, stderr=None) as process:
            assert process.stdout is not None
            received = b""
            with anyio.fail_after(30):
                while (found := re.search(rb"^RUN (\w+)$", received, re.MULTILINE)) is None:
                    received += await process.stdout.receive()
            process.kill()
            await process.wait()
        run_id = found[1].decode()
        async with SqliteStore(db_path) as store:
            assert store.recovered == (run_id,)
            run = await store.get_run(run_id)
        assert run.status == "interrupted"
        assert [(s.stage, s.status) for s in run.stages] == [("first", "succeeded"), ("hang", "interrupted")]
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()


class TestExports:
    def test_all_is_honest(self) -> None:
        """pipekit.store's __all__ is a tuple of every public name once, each reporting the public module."""
        names = store_module.__all__  # ruff (RUF022) keeps it sorted
        assert isinstance(names, tuple)
        assert len(names) == len(set(names))
        public = {
            name
            for name, value in vars(store_module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        } - {"annotations"}
        assert public == set(names)
        for name in names:
            module = getattr(getattr(store_module, name), "__module__", "pipekit.store")
            if isinstance(module, str) and module.startswith("pipekit"):
                assert module == "pipekit.store", name

    def test_error_tree(self) -> None:
        """Store errors are PipekitErrors; RunNotFoundError is a LookupError too."""
        assert issubclass(StoreError, pk.PipekitError)
        assert issubclass(StoreLockedError, StoreError)
        assert issubclass(StoreVersionError, StoreError)
        assert issubclass(RunNotFoundError, StoreError)
        assert issubclass(RunNotFoundError, LookupError)

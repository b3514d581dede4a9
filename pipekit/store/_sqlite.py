"""`SqliteStore`: the embedded default `RunStore`, stdlib sqlite3 in a worker thread."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread
import structlog
import tenacity as _t

from ._database import Database, is_busy, translate
from ._errors import StoreError, StoreLockedError
from ._recorder import RunRecorder
from ._values import RUN_STATUSES, PipelineStats, RunPage, RunRecord, WriteBatch

__all__ = ["DEFAULT_PATH", "SqliteStore", "open_store"]

#: Where the run history lives unless told otherwise (relative to the working directory).
DEFAULT_PATH = ".pipekit/pipekit.db"

T = TypeVar("T")
SleepFunction = Callable[[float], Awaitable[None]]

_log = structlog.get_logger("pipekit")


def _epoch(name: str, value: datetime | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise TypeError(f"{name} must be a datetime or seconds since the epoch, got {value!r}")


def _statuses(status: str | Iterable[str] | None) -> tuple[str, ...]:
    if status is None:
        return ()
    wanted = (status,) if isinstance(status, str) else tuple(status)
    for s in wanted:
        if s not in RUN_STATUSES:
            raise ValueError(f"unknown run status {s!r}; expected one of {', '.join(sorted(RUN_STATUSES))}")
    return tuple(str(s) for s in wanted)  # a pk.Status becomes its plain value


class SqliteStore:
    """The run history in a SQLite database file (the default `RunStore`).

    Use it as an async context manager: entering creates the file's directory
    and the database, applies any missing schema migrations (in one
    transaction), and marks runs whose recording process on this host is gone
    as ``interrupted`` (their ids are in `recovered`)::

        async with SqliteStore(".pipekit/pipekit.db") as store:
            page = await store.list_runs(status="failed")

    All SQLite work happens in a worker thread (one connection, one call at a
    time), in WAL mode so readers never wait for the writer. Each write is
    one transaction. When another process holds the database locked, an
    operation is retried with exponential back-off, then fails with
    `StoreLockedError`.

    Args:
        path: The database file.
        busy_timeout: Seconds SQLite itself waits for a lock in each attempt.
        lock_attempts: Attempts an operation gets while the database is locked.
        lock_backoff: Seconds before the second attempt; doubles per attempt (at most 2 s).
        sleep: The back-off sleep (``anyio.sleep`` by default); inject a fake in tests.

    Attributes:
        path: The database file, as given.
        recovered: Ids of the runs marked ``interrupted`` when the store opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        busy_timeout: float = 0.2,
        lock_attempts: int = 8,
        lock_backoff: float = 0.05,
        sleep: SleepFunction | None = None,
    ) -> None:
        if not isinstance(lock_attempts, int) or isinstance(lock_attempts, bool) or lock_attempts < 1:
            raise ValueError(f"SqliteStore lock_attempts must be an integer >= 1, got {lock_attempts!r}")
        for label, seconds in (("busy_timeout", busy_timeout), ("lock_backoff", lock_backoff)):
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
                raise ValueError(f"SqliteStore {label} must be a number of seconds >= 0, got {seconds!r}")
        self.path = os.fspath(path)
        self.recovered: tuple[str, ...] = ()
        self._db = Database(self.path, busy_timeout=float(busy_timeout))
        self._lock_attempts = lock_attempts
        self._lock_backoff = float(lock_backoff)
        self._sleep: SleepFunction = sleep or anyio.sleep
        self._limiter: anyio.CapacityLimiter | None = None
        self._state = "new"
        self._recorders: weakref.WeakSet[RunRecorder] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path!r} {self._state}>"

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Open the database (what entering the ``async with`` block does).

        Raises:
            StoreVersionError: If a newer pipekit wrote the database.
            StoreLockedError: If another process kept it locked.
            StoreError: If it cannot be created or opened, or is not a pipekit database.
        """
        if self._state != "new":
            raise RuntimeError("a SqliteStore can be opened only once")
        self._state = "opening"
        self._limiter = anyio.CapacityLimiter(1)
        try:
            await self._call(self._db.connect, retry=False)
            self.recovered = await self._call(self._db.setup)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close()
            raise
        self._state = "open"
        if self.recovered:
            _log.warning("pipekit.store.runs_interrupted", path=self.path, runs=list(self.recovered))

    async def aclose(self) -> None:
        """Close the database; waits for an operation in progress. Closing twice is harmless."""
        if self._state == "closed":
            return
        with anyio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        self._state = "closed"
        if self._limiter is not None:
            await anyio.to_thread.run_sync(self._db.close, limiter=self._limiter)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- calling into the worker thread -------------------------------------------

    async def _call(self, function: Callable[..., T], *args: object, retry: bool = True) -> T:
        """Run ``function`` in the worker thread, retrying while the database is locked."""
        if self._state == "closed" or self._limiter is None:
            raise StoreError(f"run database {self.path} is not open; use `async with SqliteStore(...)`", path=self.path)
        limiter = self._limiter
        retrying = _t.AsyncRetrying(
            stop=_t.stop_after_attempt(self._lock_attempts if retry else 1),
            wait=_t.wait_exponential(multiplier=self._lock_backoff, max=2.0),
            retry=_t.retry_if_exception(is_busy),
            sleep=self._sleep,
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    return await anyio.to_thread.run_sync(function, *args, limiter=limiter)
        except sqlite3.Error as exc:
            if is_busy(exc):
                plural = "attempt" if attempts == 1 else "attempts"
                raise StoreLockedError(
                    f"database {self.path} is locked by another process (gave up after {attempts} {plural}); "
                    "try again when it has finished",
                    path=self.path,
                    attempts=attempts,
                ) from exc
            raise translate(exc, self.path) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    # -- the RunStore protocol ----------------------------------------------------

    async def save(self, batch: WriteBatch) -> None:
        """Write ``batch`` as one transaction (see `RunStore.save`).

        Raises:
            StoreLockedError: If another process kept the database locked.
            StoreError: If it could not be written (read-only, disk full...).
        """
        if batch:
            await self._call(self._db.save, batch)

    async def list_runs(
        self,
        *,
        pipeline: str | None = None,
        status: str | Iterable[str] | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> RunPage:
        """One page of the runs matching the filters, newest first (see `RunStore.list_runs`).

        Like every query, it first waits for what this store's open recorders
        have recorded to be written, so it sees the runs that just ended.

        Args:
            pipeline: Only this pipeline's runs.
            status: Only runs in this status (or in any of these).
            since: Only runs started at or after this time (a datetime or seconds since the epoch).
            until: Only runs started before this time.
            limit: The page size.
            offset: Matching runs to skip.

        Returns:
            The page.

        Raises:
            ValueError: For an unknown status or a bad page.
            TypeError: For a time that is neither a datetime nor a number.
            StoreError: If the database cannot be read.
        """
        for label, value, least in (("limit", limit, 1), ("offset", offset, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"list_runs {label} must be an integer >= {least}, got {value!r}")
        statuses = _statuses(status)
        start, end = _epoch("since", since), _epoch("until", until)
        query = functools.partial(
            self._db.list_runs, pipeline=pipeline, statuses=statuses, since=start, until=end, limit=limit, offset=offset
        )
        await self._flush_recorders()
        return await self._call(query)

    async def check_writable(self) -> None:
        """Make sure runs can be recorded now: take the write lock once (retried while locked).

        Call it before running something whose history must be kept, so a
        locked or read-only database stops it before anything runs.

        Raises:
            StoreLockedError: If another process kept the database locked.
            StoreError: If it cannot be written.
        """
        await self._call(self._db.probe_write)

    def recorder(self, **options: Any) -> RunRecorder:
        """A `RunRecorder` writing into this store (what ``Engine(store=...)`` uses).

        While it is open, `get_run` first waits for what it has recorded to be
        written, so a run can be retried right after it ended.

        Args:
            options: `RunRecorder`'s keyword arguments (``definition``,
                ``trigger``...); a run's request metadata overrides them.
        """
        recorder = RunRecorder(self, **options)
        self._recorders.add(recorder)
        return recorder

    async def _flush_recorders(self) -> None:
        for recorder in list(self._recorders):
            if recorder.is_open:
                with contextlib.suppress(Exception):  # a failing write is the recorder's to report
                    await recorder.flush()

    async def get_run(self, run_id: str) -> RunRecord:
        """The whole record of one run (see `RunStore.get_run`).

        Args:
            run_id: The run's id, or a prefix of it matching only that run.

        Returns:
            The record, with its stages and definition.

        Raises:
            RunNotFoundError: If no run matches, or the prefix matches several.
            StoreError: If the database cannot be read.
        """
        if not isinstance(run_id, str):
            raise TypeError(f"get_run takes a run id string, got {type(run_id).__name__}")
        await self._flush_recorders()
        return await self._call(self._db.get_run, run_id)

    async def stats(self, *, pipeline: str | None = None, since: datetime | float | None = None) -> list[PipelineStats]:
        """Statistics of finished runs per pipeline (see `RunStore.stats`).

        Args:
            pipeline: Only this pipeline.
            since: Only runs started at or after this time.

        Returns:
            One entry per pipeline with finished runs, by name.

        Raises:
            StoreError: If the database cannot be read.
        """
        await self._flush_recorders()
        return await self._call(self._db.stats, pipeline, _epoch("since", since))


@asynccontextmanager
async def open_store(path: str | os.PathLike[str] = DEFAULT_PATH) -> AsyncIterator[SqliteStore]:
    """Open the run history at ``path`` for the duration of an ``async with`` block.

    Args:
        path: The SQLite database file.

    Yields:
        The open store.

    Raises:
        StoreError: If it cannot be opened (see `SqliteStore.open`).
    """
    async with SqliteStore(path) as store:
        yield store

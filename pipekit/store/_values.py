"""What the run store keeps: frozen records to read, rows to write, and the `RunStore` protocol."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

from pipekit._history import RunStore as _CoreRunStore
from pipekit._history import restorable_outputs, reusable
from pipekit._status import Status

__all__ = [
    "INTERRUPTED",
    "RUN_STATUSES",
    "PipelineStats",
    "RunPage",
    "RunRecord",
    "RunRow",
    "RunStore",
    "StageRecord",
    "StageRow",
    "WriteBatch",
]

#: The status of a run (and of its unfinished stages) whose recording process
#: ended before the run did.
INTERRUPTED = "interrupted"

#: Every status a recorded run can have: ``running`` while it runs, then one of
#: `pipekit.Status`'s final states, or ``interrupted``.
RUN_STATUSES: frozenset[str] = frozenset(
    {Status.RUNNING.value, Status.SUCCEEDED.value, Status.FAILED.value, Status.TIMED_OUT.value}
    | {Status.CANCELLED.value, INTERRUPTED}
)

RollbackStatus = Literal["rolled_back", "rollback_failed"]


# -- read side ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StageRecord:
    """One stage of a recorded run.

    Stages of nested pipelines are named by their path from the run's
    pipeline: stage ``test`` of pipeline ``checks`` nested in the run's
    pipeline is ``checks/test`` (``checks`` itself is a stage too).

    Attributes:
        stage: The stage's name (qualified, for nested pipelines).
        pipeline: The pipeline the stage belongs to (the nested one's name for nested stages).
        status: ``running``, then a `pipekit.Status` value (``succeeded``,
            ``failed``, ``timed_out``, ``cancelled``, ``skipped``), or
            ``interrupted``. It is the forward outcome: a stage that succeeded
            and was then compensated is ``succeeded`` with ``rollback_status``
            ``"rolled_back"``.
        attempts: Attempts made (0 if it never started).
        started_at: When its first attempt started (UTC).
        finished_at: When it finished (UTC).
        duration: Seconds from start to finish.
        output: What it returned, decoded from JSON (None unless it succeeded
            with a restorable output).
        output_restorable: False when the output could not be stored as JSON
            (not serialisable, non-string keys, NaN, or too big); ``output``
            is None then and a retry must run the stage again.
        error: ``"Type: message"`` of the error it failed with.
        reason: Why it was skipped or interrupted, in words.
        rollback_status: None (not compensated), ``"rolled_back"`` or ``"rollback_failed"``.
        rollback_error: ``"Type: message"`` of the error its rollback raised.
        log_tail: The last lines the stage's commands printed
            (`pipekit.ci.OutputLine` events), oldest first.
    """

    stage: str
    pipeline: str
    status: str
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration: float | None = None
    output: Any = attrs.field(default=None, repr=False)
    output_restorable: bool = True
    error: str | None = None
    reason: str | None = None
    rollback_status: RollbackStatus | None = None
    rollback_error: str | None = None
    log_tail: tuple[str, ...] = attrs.field(default=(), repr=False)

    @property
    def retries(self) -> int:
        """Attempts beyond the first."""
        return max(self.attempts - 1, 0)

    @property
    def reusable(self) -> bool:
        """Whether a retry may skip this stage and restore its output instead.

        True when it succeeded, was not compensated afterwards, and its output
        was stored.
        """
        return reusable(self)


@attrs.frozen(kw_only=True)
class RunRecord:
    """One recorded execution of a pipeline.

    `RunStore.list_runs` returns summaries: ``stages`` is empty and
    ``definition`` None there (``definition_hash`` says whether there is one);
    `RunStore.get_run` fills both.

    Attributes:
        id: The execution's own id (each execution has a new one, even when
            the same request runs again).
        request_id: The id of the request it served.
        request_type: The request's ``type``.
        pipeline: The pipeline's name.
        definition_hash: SHA-256 (hex) of the definition text, if one was given.
        definition: The definition text (a pipeline file, say), if one was given.
        source: Where the pipeline came from, if the runner said (request
            metadata ``pipekit.source``: a file or ``module:attribute``).
        input: The request input, decoded from JSON.
        input_restorable: False when the input was not JSON-serialisable; the
            values that were not are stored as their ``repr``.
        trigger: What started it (``"api"``, ``"cli"``, ``"retry"``...).
        status: ``running``, then ``succeeded``, ``failed``, ``timed_out``,
            ``cancelled``, or ``interrupted`` when the recording process ended
            before the run did.
        started_at: When it started (UTC).
        finished_at: When it finished (UTC), once it did.
        duration: Seconds it took (rollback included), once finished.
        error: ``"Type: message"`` of the run's error (with its cause).
        retry_of: The id of the run this one retried.
        host: The host the run was recorded on.
        pid: The process that recorded it.
        stages: Its stages in the order they started (skipped ones included),
            when fetched whole.
    """

    id: str
    request_id: str
    request_type: str = ""
    pipeline: str
    definition_hash: str | None = None
    definition: str | None = attrs.field(default=None, repr=False)
    source: str | None = None
    input: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    input_restorable: bool = True
    trigger: str = "api"
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    duration: float | None = None
    error: str | None = None
    retry_of: str | None = None
    host: str = ""
    pid: int = 0
    stages: tuple[StageRecord, ...] = attrs.field(default=(), repr=False)

    @property
    def finished(self) -> bool:
        """Whether the run ended (or was marked interrupted)."""
        return self.status != Status.RUNNING.value

    def stage(self, name: str) -> StageRecord:
        """The record of stage ``name``.

        Raises:
            KeyError: Naming the stage, if the run has no such stage (or was
                fetched as a summary).
        """
        for record in self.stages:
            if record.stage == name:
                return record
        raise KeyError(f"run {self.id} has no stage {name!r}")

    def restorable_outputs(self, names: Collection[str] | None = None) -> dict[str, Any]:
        """The outputs a retry can restore: top-level stages that are `StageRecord.reusable`.

        Stages of nested pipelines are not listed; a nested pipeline counts as
        one stage (its output maps its stages' names to their outputs).

        Args:
            names: Only these stages (the pipeline being retried has them).
        """
        return restorable_outputs(self, names)


@attrs.frozen(kw_only=True)
class RunPage:
    """One page of `RunStore.list_runs`: runs newest first.

    Attributes:
        runs: The runs on this page (summaries: no stages, no definition text).
        total: How many runs match the filters, on all pages.
        limit: The page size asked for.
        offset: How many matching runs come before this page.
    """

    runs: tuple[RunRecord, ...]
    total: int
    limit: int
    offset: int

    @property
    def next_offset(self) -> int | None:
        """The ``offset`` of the next page, or None on the last one."""
        following = self.offset + len(self.runs)
        return following if self.runs and following < self.total else None


@attrs.frozen(kw_only=True)
class PipelineStats:
    """Statistics of one pipeline's finished runs.

    Runs still running are not counted. Durations are nearest-rank
    percentiles over the finished runs that have one.

    Attributes:
        pipeline: The pipeline's name.
        runs: Finished runs.
        succeeded: Of which succeeded.
        failed: Of which did not (failed, timed out, cancelled or interrupted).
        success_rate: ``succeeded / runs`` (0.0 with none).
        mean_duration: Mean duration in seconds.
        p50_duration: Median duration in seconds.
        p95_duration: 95th percentile duration in seconds.
        flakiest: ``(stage, retries)`` of the stages retried most over these
            runs, most retries first (only stages retried at least once).
        last_started_at: When the latest of these runs started.
    """

    pipeline: str
    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    success_rate: float = 0.0
    mean_duration: float | None = None
    p50_duration: float | None = None
    p95_duration: float | None = None
    flakiest: tuple[tuple[str, int], ...] = ()
    last_started_at: datetime | None = None


# -- write side ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RunRow:
    """The state of one run, as written: JSON as text, times as seconds since the epoch.

    A backend stores it as an upsert keyed by ``id``: ``id``,
    ``request_id``, ``request_type``, ``pipeline``, ``definition_hash``,
    ``definition``, ``source``, ``input``, ``input_restorable``, ``trigger``,
    ``retry_of``, ``host``, ``pid`` and ``started_at`` never change once
    written; the rest is the latest state. ``updated_at`` is the time of its
    latest event (an interrupted run's end).
    """

    id: str
    request_id: str
    request_type: str
    pipeline: str
    definition_hash: str | None
    definition: str | None = attrs.field(repr=False)
    source: str | None = None
    input: str = attrs.field(repr=False)
    input_restorable: bool
    trigger: str
    retry_of: str | None
    host: str
    pid: int
    status: str
    started_at: float
    updated_at: float
    finished_at: float | None = None
    duration: float | None = None
    error: str | None = None


@attrs.frozen(kw_only=True)
class StageRow:
    """The state of one stage of a run, as written (an upsert keyed by ``run_id`` and ``stage``).

    ``position`` orders a run's stages (the order they were first seen);
    ``output`` is JSON text (None when there is none or it is not restorable).
    """

    run_id: str
    stage: str
    pipeline: str
    position: int
    status: str
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    output: str | None = attrs.field(default=None, repr=False)
    output_restorable: bool = True
    error: str | None = None
    reason: str | None = None
    rollback_status: RollbackStatus | None = None
    rollback_error: str | None = None
    log_tail: tuple[str, ...] = attrs.field(default=(), repr=False)


@attrs.frozen(kw_only=True)
class WriteBatch:
    """Rows to write in one transaction: all of them or none."""

    runs: tuple[RunRow, ...] = ()
    stages: tuple[StageRow, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.runs or self.stages)


@runtime_checkable
class RunStore(_CoreRunStore, Protocol):
    """Where run history is kept: `SqliteStore` by default; another database can implement it.

    It extends [`pipekit.RunStore`][pipekit.RunStore] (what an
    [`Engine`][pipekit.Engine] needs: ``recorder()`` and ``get_run``) with
    writes and queries. Writes take plain rows (`WriteBatch`), so a backend
    needs no knowledge of pipekit's events; `RunRecorder` turns a run's
    events into them (``recorder()`` returns ``RunRecorder(self)``). Every
    method raises `StoreError` (one line) when the database cannot be used.
    """

    async def save(self, batch: WriteBatch) -> None:
        """Write ``batch`` as one transaction (upserting each row); nothing of it on failure.

        Raises:
            StoreError: If it could not be written.
        """
        ...

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
        """One page of the runs matching the filters, newest first.

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
            ValueError: For an unknown status or a negative page.
        """
        ...

    async def get_run(self, run_id: str) -> RunRecord:
        """The whole record of one run: its stages, input and definition.

        Args:
            run_id: The run's id, or a prefix of it matching only that run.

        Returns:
            The record.

        Raises:
            RunNotFoundError: If no run matches, or the prefix matches several.
        """
        ...

    async def stats(self, *, pipeline: str | None = None, since: datetime | float | None = None) -> list[PipelineStats]:
        """Statistics per pipeline (of one, when ``pipeline`` is given), by pipeline name.

        Args:
            pipeline: Only this pipeline.
            since: Only runs started at or after this time.

        Returns:
            One entry per pipeline with finished runs.
        """
        ...

    async def aclose(self) -> None:
        """Release the database."""
        ...

"""`RunRecorder`: a hook that turns a run's events into rows and writes them in batches, off the run's path."""

from __future__ import annotations

import hashlib
import math
import os
import socket
import uuid
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Protocol, Self

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import structlog

from pipekit import _events as ev
from pipekit._status import Status

from ._errors import StoreError
from ._state import RUNNING, RunState, StageState, describe, encode_input, encode_json
from ._values import INTERRUPTED, RunRow, WriteBatch

__all__ = ["RecorderStatistics", "RunRecorder"]

_log = structlog.get_logger("pipekit")

#: The kinds of the events recorded on a stage's row (``output_line``: `pipekit.ci.OutputLine`).
_STAGE_KINDS = frozenset(
    {
        ev.StageStarted.kind,
        ev.StageRetrying.kind,
        ev.StageSucceeded.kind,
        ev.StageFailed.kind,
        ev.StageCancelled.kind,
        ev.StageSkipped.kind,
        ev.StageRolledBack.kind,
        ev.StageRollbackFailed.kind,
        "output_line",
    }
)
#: How many request id -> run id pairs `RunRecorder.run_ids` remembers.
_RUN_IDS_KEPT = 10_000


@attrs.frozen(kw_only=True)
class RecorderStatistics:
    """Counters of a `RunRecorder`.

    Attributes:
        events: Events received.
        runs: Executions started.
        batches: Batches written.
        rows: Rows written (a row written again in a later batch counts again).
        failures: Batches that failed to write (each retried later).
        pending: Rows waiting to be written.
    """

    events: int = 0
    runs: int = 0
    batches: int = 0
    rows: int = 0
    failures: int = 0
    pending: int = 0


class BatchWriter(Protocol):
    """What a `RunRecorder` needs of a store: `RunStore.save`."""

    async def save(self, batch: WriteBatch) -> None:
        """Write ``batch`` as one transaction."""
        ...


class RunRecorder:
    """Records the runs whose events it receives into a `RunStore`: a hook, and an async context manager.

    Pass it as a hook (``pipeline.execute(request, hooks=[recorder])``,
    ``Pipeline.with_hooks``, ``Engine(hooks=[...])``) inside its ``async
    with`` block::

        async with SqliteStore() as store, RunRecorder(store, trigger="cli") as recorder:
            response = await pipeline.execute(request, hooks=[recorder])
        run_id = recorder.run_ids[request.id]

    Each top-level ``PipelineStarted`` begins a new execution with a new id
    (so running the same request again never overwrites the earlier run);
    the events of pipelines nested in it belong to it, their stages named
    ``inner/stage``.

    Calling the hook never waits for the disk: it updates the run's state in
    memory, and a writer task writes what changed, in batches of one
    transaction each: after ``batch_size`` events, ``flush_interval`` seconds
    after the first unwritten one, and as soon as a run finishes. Rows
    written again replace the earlier version, so state accumulates without
    bound only per run, never per event. Only when more than ``max_pending``
    rows wait (the store has fallen far behind, or keeps failing) does the
    hook wait for the writer; nothing is dropped. A batch that fails is
    logged (``pipekit.store.write_failed``) and retried later.

    Leaving the block writes everything still pending (shielded from
    cancellation, bounded by ``close_timeout``), marking runs that have not
    finished ``interrupted``. If that fails, leaving raises the store's error
    (or adds a note to the block's own exception). The recorder must enclose
    the runs it records: events arriving after it closed are refused.

    Args:
        store: Where to write.
        definition: The pipeline's definition text (a pipeline file), kept with
            each run with its SHA-256, so the run can be retried as it was.
        trigger: What started the runs (``"api"``, ``"cli"``, ``"retry"``...).
        retry_of: The id of the run these runs retry.
        batch_size: Events after which a batch is written.
        flush_interval: Seconds unwritten changes wait at most (also the pause
            before retrying a failed batch).
        max_pending: Rows waiting to be written beyond which the hook waits.
        close_timeout: Seconds leaving may take to finish writing (the write in progress, then the last one).
        log_lines: Lines of command output kept per stage (the tail).
        log_bytes: Bytes of command output kept per stage (the tail).
        max_output_bytes: Larger stage outputs are not stored (marked not restorable).
    """

    def __init__(
        self,
        store: BatchWriter,
        *,
        definition: str | None = None,
        trigger: str = "api",
        retry_of: str | None = None,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        max_pending: int = 10_000,
        close_timeout: float = 30.0,
        log_lines: int = 200,
        log_bytes: int = 64 * 1024,
        max_output_bytes: int = 1024 * 1024,
    ) -> None:
        if definition is not None and not isinstance(definition, str):
            raise TypeError(f"RunRecorder definition must be the definition's text, got {type(definition).__name__}")
        for label, count in (
            ("batch_size", batch_size),
            ("max_pending", max_pending),
            ("log_lines", log_lines),
            ("log_bytes", log_bytes),
            ("max_output_bytes", max_output_bytes),
        ):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"RunRecorder {label} must be an integer >= 1, got {count!r}")
        for label, seconds in (("flush_interval", flush_interval), ("close_timeout", close_timeout)):
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
                raise ValueError(f"RunRecorder {label} must be a number of seconds >= 0, got {seconds!r}")
        self.store = store
        self.definition = definition
        self.definition_hash = None if definition is None else hashlib.sha256(definition.encode()).hexdigest()
        self.trigger = trigger
        self.retry_of = retry_of
        self._batch_size = batch_size
        self._flush_interval = float(flush_interval)
        self._max_pending = max_pending
        self._close_timeout = float(close_timeout)
        self._log_lines = log_lines
        self._log_bytes = log_bytes
        self._max_output = max_output_bytes
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._state = "new"
        self._tg: anyio.abc.TaskGroup | None = None
        self._wake: anyio.Event  # made when entered, in the event loop that uses them
        self._settled: anyio.Event
        self._stopped: anyio.Event  # set when the writer task has ended
        self._writer_scope: anyio.CancelScope
        self._active: dict[str, RunState] = {}  # request id -> its execution in progress
        self._dirty_runs: dict[str, RunState] = {}
        self._dirty_stages: dict[tuple[str, str], StageState] = {}
        self._unwritten = 0  # events since the last batch was taken
        self._in_flight = 0  # rows being written
        self._taken = 0  # batches taken to be written (numbered from 1)
        self._done = 0  # the number of the last batch whose write ended (written or failed)
        self._saving: anyio.CancelScope | None = None  # the shielded scope of the writer's write in progress
        self._deadline = math.inf  # when leaving must be done (set on leaving)
        self._cut_short = False  # whether leaving cut a write short
        self._writing = False  # whether the writer task runs
        self._urgent = False
        self._run_ids: dict[str, str] = {}
        self.last_run_id: str | None = None
        self._error: Exception | None = None
        self._events = self._runs = self._batches = self._rows = self._failures = 0

    # -- what callers read ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether it is inside its ``async with`` block (recording)."""
        return self._state == "open"

    @property
    def run_ids(self) -> Mapping[str, str]:
        """Request id -> the id of its latest execution recorded here (the most recent 10,000 requests)."""
        return MappingProxyType(self._run_ids)

    @property
    def error(self) -> Exception | None:
        """The error of the latest failed write, until a write succeeds again."""
        return self._error

    def statistics(self) -> RecorderStatistics:
        """Counters of what was received and written so far."""
        return RecorderStatistics(
            events=self._events,
            runs=self._runs,
            batches=self._batches,
            rows=self._rows,
            failures=self._failures,
            pending=self._pending(),
        )

    def __repr__(self) -> str:
        return f"<RunRecorder {self._state} runs={self._runs} pending={self._pending()}>"

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a RunRecorder can be entered only once")
        self._wake = anyio.Event()
        self._settled = anyio.Event()
        self._stopped = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "open"
        try:
            await tg.start(self._writer)
        except BaseException as exc:  # cancelled meanwhile (so is the writer): leave the task group entered above
            self._state = "closed"
            self._settled.set()
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._writer_scope.shield = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self._state = "closing"
        # Leaving -- the write in progress, then the last one -- takes close_timeout at most.
        self._deadline = anyio.current_time() + self._close_timeout
        if self._saving is not None:
            self._saving.deadline = self._deadline
        self._wake.set()
        try:
            # The writer ends by itself once woken (a write in progress is cut
            # short at the deadline). Waiting for it shielded, the task group
            # has nothing left to wait for: an enclosing cancellation cannot
            # replace the block's own exception, which is not handed to the
            # task group either: it propagates as it is (not in an ExceptionGroup).
            with anyio.CancelScope(shield=True):
                await self._stopped.wait()
                await anyio.lowlevel.cancel_shielded_checkpoint()  # the task group sees its task end
            await self._tg.__aexit__(None, None, None)
        finally:
            # The writer is gone, and so are the runs' events (a cancelled run
            # reports its end before the block exits): the last write, shielded.
            with anyio.CancelScope(shield=True):
                self._interrupt_unfinished()
                await self._flush()  # bounded by the deadline
            self._state = "closed"
            self._settled.set()
        error = self._error
        if self._pending() and (error is None or self._cut_short):
            error = StoreError(
                f"writing the run history did not finish within {self._close_timeout:g}s; "
                f"{self._pending()} rows were not written"
            )
        if error is not None and self._pending():
            if exc is None:
                raise error
            _log.error("pipekit.store.write_failed", error=str(error), pending=self._pending(), final=True)
            exc.add_note(f"the run history was not fully written: {error}")

    async def flush(self) -> None:
        """Wait until everything recorded so far is written.

        Events recorded while it waits are not waited for (so it returns even
        while runs keep recording).

        Raises:
            RuntimeError: If the recorder is not open, or its writer has
                stopped (it failed: the block is ending).
            Exception: The store's error (a `StoreError`) if a write failed;
                the rows stay pending and are retried.
        """
        if not self._pending():
            return
        # The batch that will hold what is recorded now: the one being written, or the next.
        target = self._taken + (1 if self._dirty_runs or self._dirty_stages else 0)
        while self._done < target:
            if self._state != "open":
                raise RuntimeError(f"RunRecorder is {self._state}")
            if not self._writing:
                raise RuntimeError("RunRecorder's writer is not running: it failed (its block is ending)")
            self._urgent = True
            settled = self._settled
            self._wake.set()
            await settled.wait()
            if self._error is not None:
                raise self._error

    # -- the hook ------------------------------------------------------------------

    async def __call__(self, event: ev.Event) -> None:
        """Record ``event`` (in memory; the writer task writes it soon).

        Raises:
            RuntimeError: If the recorder is not open (outside its ``async with`` block).
        """
        if self._state != "open":
            raise RuntimeError(
                f"RunRecorder is {self._state}: it records only inside its `async with` block "
                f"(event {event.kind} of request {event.request_id} was not recorded)"
            )
        self._events += 1
        self._apply(event)
        self._unwritten += 1
        if self._unwritten == 1 or self._urgent or self._unwritten >= self._batch_size:
            self._wake.set()
        while self._pending() > self._max_pending and self._state == "open" and self._writing:
            self._wake.set()
            await self._settled.wait()

    def _apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.PipelineStarted) and event.parent is None:
            if event.dry_run:
                return  # nothing ran: nothing to record
            self._begin(event)
            return
        run = self._active.get(event.request_id)
        if run is None:  # a run that started before the recorder was attached
            return
        timestamp = event.timestamp
        run.updated_at = max(run.updated_at, timestamp)
        self._dirty_runs[run.id] = run
        if isinstance(event, ev.PipelineStarted):
            assert event.parent is not None
            run.prefixes[event.pipeline] = f"{run.prefixes.get(event.parent, '')}{event.pipeline}/"
            return
        if isinstance(event, ev.PipelineFinished):
            if event.parent is None:
                run.status = event.status.value
                run.finished_at = timestamp
                run.duration = event.duration
                run.error = describe(event.error)
                del self._active[event.request_id]
                self._urgent = True
            return
        if event.stage is None or event.kind not in _STAGE_KINDS:
            return
        stage = self._stage(run, event.pipeline, event.stage)
        if event.kind == "output_line":  # pipekit.ci.OutputLine (the store does not need the CI layer)
            self._append_line(stage, str(getattr(event, "line", "")))
        elif isinstance(event, ev.StageStarted):
            stage.status = RUNNING
            stage.started_at = timestamp
            stage.attempts = max(stage.attempts, event.attempt, 1)
        elif isinstance(event, ev.StageRetrying):
            stage.attempts = max(stage.attempts, event.attempt + 1)
        elif isinstance(event, ev.StageSucceeded):
            stage.attempts = max(stage.attempts, event.attempt)
            stage.finish(Status.SUCCEEDED.value, timestamp, event.duration)
            stage.output = encode_json(event.output, self._max_output)
            stage.output_restorable = stage.output is not None
            stage.error = None
        elif isinstance(event, ev.StageFailed):
            stage.attempts = max(stage.attempts, event.attempt)
            stage.finish(event.status.value, timestamp, event.duration)
            stage.error = describe(event.error)
        elif isinstance(event, ev.StageCancelled):
            stage.attempts = max(stage.attempts, event.attempt)
            stage.finish(event.status.value, timestamp)
            stage.reason = event.reason or None
        elif isinstance(event, ev.StageSkipped):
            stage.status = Status.SKIPPED.value
            stage.reason = event.reason or None
        elif isinstance(event, ev.StageRolledBack):
            stage.rollback_status = "rolled_back"
        elif isinstance(event, ev.StageRollbackFailed):
            stage.rollback_status = "rollback_failed"
            stage.rollback_error = describe(event.error)
        self._dirty_stages[run.id, stage.name] = stage

    def _begin(self, event: ev.PipelineStarted) -> None:
        input_text, restorable = encode_input(event.input)
        # The request's metadata says what this recorder cannot know for every
        # run it sees (one recorder serves a whole engine).
        meta = event.metadata
        definition = meta.get("pipekit.definition", self.definition)
        definition_hash = (
            self.definition_hash
            if definition is self.definition
            else hashlib.sha256(definition.encode()).hexdigest()
            if definition is not None
            else None
        )
        template = RunRow(
            id=uuid.uuid4().hex,
            request_id=event.request_id,
            request_type=event.request_type,
            pipeline=event.pipeline,
            definition_hash=definition_hash,
            definition=definition,
            source=meta.get("pipekit.source"),
            input=input_text,
            input_restorable=restorable,
            trigger=meta.get("pipekit.trigger", self.trigger),
            retry_of=meta.get("pipekit.retry_of", self.retry_of),
            host=self._host,
            pid=self._pid,
            status=RUNNING,
            started_at=event.timestamp,
            updated_at=event.timestamp,
        )
        run = RunState(template)
        self._active[event.request_id] = run
        self._dirty_runs[run.id] = run
        self._runs += 1
        self._run_ids.pop(event.request_id, None)
        self._run_ids[event.request_id] = run.id
        if len(self._run_ids) > _RUN_IDS_KEPT:
            del self._run_ids[next(iter(self._run_ids))]
        self.last_run_id = run.id

    @staticmethod
    def _stage(run: RunState, pipeline: str, name: str) -> StageState:
        qualified = run.prefixes.get(pipeline, "") + name
        stage = run.stages.get(qualified)
        if stage is None:
            stage = run.stages[qualified] = StageState(qualified, pipeline, len(run.stages))
        return stage

    def _append_line(self, stage: StageState, line: str) -> None:
        if len(line) > self._log_bytes:
            line = line[-self._log_bytes :]
        tail = stage.tail
        tail.append(line)
        stage.tail_bytes += len(line.encode("utf-8", "replace")) + 1
        while len(tail) > self._log_lines or (stage.tail_bytes > self._log_bytes and len(tail) > 1):
            stage.tail_bytes -= len(tail.popleft().encode("utf-8", "replace")) + 1

    # -- the writer ----------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._dirty_runs) + len(self._dirty_stages) + self._in_flight

    async def _wait(self) -> None:
        """Wait for the hook (or closing) to wake the writer."""
        wake = self._wake
        await wake.wait()
        if self._wake is wake:
            self._wake = anyio.Event()

    async def _writer(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write batches until the recorder closes.

        Shielded once the recorder is open: it ends when the block does
        (`__aexit__` wakes it), not when an enclosing scope is cancelled, so
        the events of runs being cancelled and rolled back are still written
        (and `flush` still works) meanwhile.
        """
        scope = self._writer_scope = anyio.CancelScope()  # __aenter__ shields it once started
        self._writing = True
        task_status.started()
        try:
            with scope:
                await self._write_batches()
        finally:
            self._writing = False
            self._stopped.set()

    async def _write_batches(self) -> None:
        while self._state == "open":
            if not self._pending():
                await self._wait()
                continue
            with anyio.move_on_after(self._flush_interval):
                while (
                    self._state == "open"
                    and not self._urgent
                    and self._unwritten < self._batch_size
                    and self._pending() <= self._max_pending
                ):
                    await self._wait()
            if not await self._flush():
                # Pause before retrying; closing, flush() or a finished run cut it short.
                with anyio.move_on_after(self._flush_interval):
                    while self._state == "open" and not self._urgent:
                        await self._wait()

    def _interrupt_unfinished(self) -> None:
        """Mark the runs still in progress as interrupted: the recorder stops recording them."""
        for run in self._active.values():
            run.status = INTERRUPTED
            run.finished_at = run.updated_at
            run.duration = max(run.updated_at - run.template.started_at, 0.0)
            run.error = "the run history recorder was closed before the run finished"
            self._dirty_runs[run.id] = run
            for stage in run.stages.values():
                if stage.status in (RUNNING, Status.PENDING.value):
                    stage.finish(INTERRUPTED, run.updated_at)
                    stage.reason = "interrupted: the recorder was closed"
                    self._dirty_stages[run.id, stage.name] = stage
        self._active.clear()

    async def _flush(self) -> bool:
        """Write everything changed as one batch; on failure keep it for the next one. True if written.

        A write in progress is shielded from cancellation, so its outcome is
        known, until leaving the block cuts it short at its deadline
        (``close_timeout``): that counts as a failure.
        """
        runs, stages = self._dirty_runs, self._dirty_stages
        if not runs and not stages:
            return True
        self._taken += 1
        number = self._taken
        self._dirty_runs, self._dirty_stages = {}, {}
        self._unwritten = 0
        self._urgent = False
        batch = WriteBatch(
            runs=tuple(run.row() for run in runs.values()),
            stages=tuple(stage.row(run_id) for (run_id, _), stage in stages.items()),
        )
        self._in_flight = len(batch.runs) + len(batch.stages)
        try:
            with anyio.CancelScope(shield=True, deadline=self._deadline) as scope:
                self._saving = scope
                await self.store.save(batch)
            if scope.cancelled_caught:  # leaving the block cut it short
                self._cut_short = True
                raise StoreError(f"writing the run history did not finish within {self._close_timeout:g}s")
        except BaseException as exc:
            self._saving = None
            self._done = number
            self._in_flight = 0
            # The live state is at least as new as the rows that failed: mark it to be written again.
            runs.update(self._dirty_runs)
            stages.update(self._dirty_stages)
            self._dirty_runs, self._dirty_stages = runs, stages
            if not isinstance(exc, Exception):
                raise
            self._error = exc
            self._failures += 1
            _log.warning("pipekit.store.write_failed", error=str(exc), pending=self._pending())
            self._settle()
            return False
        self._saving = None
        self._done = number
        self._in_flight = 0
        self._error = None
        self._batches += 1
        self._rows += len(batch.runs) + len(batch.stages)
        self._settle()
        return True

    def _settle(self) -> None:
        """Wake those waiting for a write to finish (`flush`, a hook held back)."""
        settled, self._settled = self._settled, anyio.Event()
        settled.set()

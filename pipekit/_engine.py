"""The Engine actor: a bounded mailbox of requests, run with limited concurrency."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry import context as otel_context

from ._errors import PipekitError
from ._events import DEFAULT_HOOK_TIMEOUT
from ._events_log import EventLog, EventStream
from ._history import RunStore, restorable_outputs
from ._instrument import ATTR_PIPELINE, get_instruments
from ._pipeline import make_request
from ._request import PipelineRequest, PipelineResponse, RequestOptions
from ._run import _Run, execute_pipeline
from ._status import Status

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ._pipeline import Hook, Pipeline

__all__ = ["Engine", "ExecutionHandle", "PipelineMetrics"]


@attrs.frozen(kw_only=True)
class PipelineMetrics:
    """Counters and latency percentiles of one pipeline's executions in an engine.

    Counts are since the engine started; percentiles cover the most recent
    executions (the engine's ``metrics_window``). Percentiles are None until
    an execution finished.

    Attributes:
        pipeline: The pipeline's name.
        total_executions: Finished executions.
        succeeded: Of which succeeded.
        failed: Of which did not succeed (failed, timed out or cancelled).
        timed_out: Of which timed out.
        cancelled: Of which were cancelled.
        success_rate: ``succeeded / total_executions`` (0.0 with none).
        p50: Median duration in seconds.
        p95: 95th percentile duration in seconds.
        p99: 99th percentile duration in seconds.
        hook_failures: Hook calls that raised during its executions.
    """

    pipeline: str
    total_executions: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    success_rate: float = 0.0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    hook_failures: int = 0


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Nearest-rank percentile.
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@attrs.define(eq=False)
class _Tally:
    attributes: Mapping[str, str]
    total: int = 0
    succeeded: int = 0
    timed_out: int = 0
    cancelled: int = 0
    hook_failures: int = 0
    durations: deque[float] = attrs.field(factory=deque)


class ExecutionHandle:
    """One submitted execution: its status, its events, and a way to wait or cancel.

    Made by `Engine.submit`; not instantiated directly.
    """

    def __init__(self, engine: Engine, pipeline: Pipeline, request: PipelineRequest, history: int) -> None:
        self._engine = engine
        self._pipeline = pipeline
        self._request = request
        self._run: _Run | None = None
        self._response: PipelineResponse | None = None
        self._done = anyio.Event()
        self._log = EventLog(history, name=f"execution {request.id}")
        self._cancel_requested = False
        self._claimed = False
        # The caller's trace context, so the run's span is a child of the span
        # that was current at submit time.
        self._otel_context = otel_context.get_current()

    @property
    def id(self) -> str:
        """The execution's id (the request id)."""
        return self._request.id

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline being run."""
        return self._pipeline

    @property
    def request(self) -> PipelineRequest:
        """The request being served."""
        return self._request

    @property
    def status(self) -> Status:
        """``PENDING`` while queued, ``RUNNING``, then the run's final status."""
        if self._response is not None:
            return self._response.status
        return Status.RUNNING if self._run is not None else Status.PENDING

    @property
    def response(self) -> PipelineResponse | None:
        """The response, once the execution finished."""
        return self._response

    def done(self) -> bool:
        """Whether the execution finished."""
        return self._done.is_set()

    async def wait(self) -> PipelineResponse:
        """Wait for the execution to finish and return its response."""
        await self._done.wait()
        assert self._response is not None
        return self._response

    def events(self) -> EventStream:
        """Iterate over this execution's events from its start, ending after ``PipelineFinished``.

        Each handle keeps its own bounded history (``Engine(execution_history=...)``),
        so calling this after the run began still yields the earlier events.
        """
        return self._log.stream(from_start=True)

    async def cancel(self) -> PipelineResponse:
        """Cancel the execution and wait until it stopped.

        Running stages are interrupted, completed ones are rolled back, and the
        status becomes ``CANCELLED``. Cancelling a finished execution changes
        nothing.

        Returns:
            The response.
        """
        if not self._done.is_set():
            self._cancel_requested = True
            if self._run is not None:
                self._run.cancel()
            elif not self._claimed:
                # Still queued: settle it here, the actor will skip it.
                self._claimed = True
                await self._engine._run_handle(self, take_slot=False)
        return await self.wait()

    def _attach(self, run: _Run) -> None:
        self._run = run
        if self._cancel_requested:
            run.cancel()

    def __repr__(self) -> str:
        return f"<ExecutionHandle {self.id} pipeline={self._pipeline.name!r} status={self.status.value}>"


class Engine:
    """Runs pipelines for an async service: an actor with a bounded mailbox.

    ``submit`` waits while the mailbox is full (backpressure); at most
    ``max_concurrent`` executions run at once. Leaving the ``async with`` block
    waits for every submitted execution; if the owner is cancelled instead,
    running executions are cancelled and rolled back, and queued ones end
    ``CANCELLED`` without running. Nothing outlives the engine. Like any anyio
    task group, the block re-raises an exception from its body wrapped in an
    ``ExceptionGroup``::

        async with pk.Engine(max_concurrent=8) as engine:
            handle = await engine.submit(pipeline, pk.PipelineRequest(input={...}))
            response = await handle.wait()

    Args:
        max_concurrent: Executions running at once.
        mailbox_size: Submitted executions waiting to start before ``submit`` waits.
        hooks: Async callables awaited with every event of every execution.
        history_size: Finished executions kept for `get` and `list`.
        execution_history: Events kept per execution for ``handle.events()``.
        event_buffer: Events kept for `events` subscribers that lag behind.
        metrics_window: Recent executions per pipeline used for percentiles.
        hook_timeout: Seconds one hook call may take; a hook that overruns
            counts as failed and is not called again during that run.
        tracer_provider: Where runs' spans go (the global provider by default).
        meter_provider: Where runs' metrics go (the global provider by default).
        store: A run history (`pipekit.store.SqliteStore`, say): every
            execution is recorded into it, and `retry` re-runs recorded ones.
    """

    def __init__(
        self,
        *,
        max_concurrent: int = 16,
        mailbox_size: int = 100,
        hooks: Sequence[Hook] = (),
        history_size: int = 1000,
        execution_history: int = 10_000,
        event_buffer: int = 10_000,
        metrics_window: int = 1000,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        store: RunStore | None = None,
    ) -> None:
        if store is not None and not isinstance(store, RunStore):
            raise TypeError(f"Engine store must be a run store (pipekit.store.SqliteStore, say), got {store!r}")
        self._store = store
        self._recorder: AbstractAsyncContextManager[Hook] | None = None
        self._known: dict[str, Pipeline] = {}
        for label, value in (
            ("max_concurrent", max_concurrent),
            ("history_size", history_size),
            ("execution_history", execution_history),
            ("event_buffer", event_buffer),
            ("metrics_window", metrics_window),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {label} must be an integer >= 1, got {value!r}")
        if not isinstance(mailbox_size, int) or mailbox_size < 0:
            raise ValueError(f"Engine mailbox_size must be an integer >= 0, got {mailbox_size!r}")
        self._max_concurrent = max_concurrent
        self._mailbox_size = mailbox_size
        self._hooks = tuple(hooks)
        self._history_size = history_size
        self._execution_history = execution_history
        self._metrics_window = metrics_window
        self._handles: dict[str, ExecutionHandle] = {}
        self._finished: deque[str] = deque()
        self._tallies: dict[str, _Tally] = {}
        self._events = EventLog(event_buffer, name="engine")
        self._tg: anyio.abc.TaskGroup | None = None
        self._send: MemoryObjectSendStream[ExecutionHandle] | None = None
        self._slots: anyio.Semaphore | None = None
        self._closed = False
        self._running = 0
        if not isinstance(hook_timeout, int | float) or not hook_timeout > 0:
            raise ValueError(f"Engine hook_timeout must be a number of seconds > 0, got {hook_timeout!r}")
        self._hook_timeout = float(hook_timeout)
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._instruments = get_instruments(tracer_provider, meter_provider)
        self._explicit_providers = tracer_provider is not None and meter_provider is not None

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise RuntimeError("an Engine can be entered only once")
        if self._store is not None:
            recorder = self._store.recorder()
            self._hooks = (*self._hooks, await recorder.__aenter__())
            self._recorder = recorder
        send, receive = anyio.create_memory_object_stream[ExecutionHandle](self._mailbox_size)
        self._send = send
        self._slots = anyio.Semaphore(self._max_concurrent)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._actor, receive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        assert self._send is not None
        self._closed = True
        self._send.close()
        leaving: BaseException | None = None  # what propagates out of the block
        try:
            suppressed = await self._tg.__aexit__(exc_type, exc, tb)
            if not suppressed:
                leaving = exc
            return suppressed
        except BaseException as error:
            leaving = error
            raise
        finally:
            self._events.close()
            if self._recorder is not None:
                # Every execution has ended: what the recorder holds is written now. Told
                # what propagates, a failed write notes itself on it instead of replacing it.
                await self._recorder.__aexit__(None if leaving is None else type(leaving), leaving, None)

    async def _actor(self, receive: MemoryObjectReceiveStream[ExecutionHandle]) -> None:
        assert self._tg is not None
        assert self._slots is not None
        # A free slot is taken before a request leaves the mailbox, so at most
        # max_concurrent + mailbox_size executions are ever accepted at once.
        async with receive:
            try:
                while True:
                    await self._slots.acquire()
                    try:
                        handle = await receive.receive()
                    except BaseException:
                        self._slots.release()
                        raise
                    if handle._claimed:  # cancelled while queued
                        self._slots.release()
                        continue
                    handle._claimed = True
                    self._tg.start_soon(self._run_handle, handle)
            except anyio.EndOfStream:
                pass
            finally:
                # Cancelled (the owner gave up): settle everything still queued
                # as CANCELLED, so no handle waits forever.
                queued: list[ExecutionHandle] = []
                while True:
                    try:
                        queued.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                with anyio.CancelScope(shield=True):
                    for handle in queued:
                        if not handle._claimed:
                            handle._claimed = True
                            handle._cancel_requested = True
                            await self._run_handle(handle, take_slot=False)

    async def _run_handle(self, handle: ExecutionHandle, *, take_slot: bool = True) -> None:
        tally = self._tally(handle.pipeline.name)

        def hook_failed() -> None:
            tally.hook_failures += 1

        instruments = self._instruments
        attributes = tally.attributes
        instruments.executions_queued.add(-1, attributes)
        instruments.executions_running.add(1, attributes)
        self._running += 1
        token = otel_context.attach(handle._otel_context)
        try:
            handle._response = await execute_pipeline(
                handle.pipeline,
                handle.request,
                hooks=self._hooks,
                listeners=(handle._log.append, self._events.append),
                on_hook_failure=hook_failed,
                on_start=handle._attach,
                tracer_provider=self._tracer_provider,
                meter_provider=self._meter_provider,
                hook_timeout=self._hook_timeout,
                # With providers given, reuse the instruments made for them; without,
                # resolve the defaults per run (a capture_spans() or global provider
                # set up after the engine was created applies too).
                instruments=self._instruments if self._explicit_providers else None,
            )
        finally:
            otel_context.detach(token)
            instruments.executions_running.add(-1, attributes)
            self._running -= 1
            if take_slot:
                assert self._slots is not None
                self._slots.release()
            if handle._response is None and handle._run is not None:
                handle._response = handle._run.response
            if handle._response is not None:
                self._record(tally, handle._response, dry_run=handle.request.options.dry_run)
            handle._log.close()
            handle._run = None  # the response has what is worth keeping; let the run go
            handle._done.set()
            self._retire(handle)

    # -- submitting -----------------------------------------------------------

    async def submit(
        self,
        pipeline: Pipeline,
        request: PipelineRequest | None = None,
        *,
        input: Mapping[str, Any] | None = None,  # noqa: A002 - the documented name
    ) -> ExecutionHandle:
        """Queue an execution and return its handle; waits while the mailbox is full.

        Args:
            pipeline: The pipeline.
            request: The request; built from ``input`` when omitted.
            input: The request input, when no request is given.

        Returns:
            The handle.

        Raises:
            PipelineDefinitionError: If the pipeline's definition is broken.
            RuntimeError: If the engine is not running, or the request id is
                already in use by an execution it knows.
        """
        if self._send is None or self._closed:
            raise RuntimeError("the Engine is not running; use `async with Engine() as engine:`")
        request = make_request(pipeline, request, input, "Engine.submit()")
        if not request.options.dry_run:  # a dry run reports a broken definition in its response
            pipeline.plan()
        if request.id in self._handles:
            raise RuntimeError(f"an execution with request id {request.id!r} already exists")
        handle = ExecutionHandle(self, pipeline, request, self._execution_history)
        self._handles[request.id] = handle
        self._known[pipeline.name] = pipeline
        queued = self._instruments.executions_queued
        attributes = self._tally(pipeline.name).attributes
        queued.add(1, attributes)
        try:
            await self._send.send(handle)
        except BaseException:
            queued.add(-1, attributes)
            del self._handles[request.id]
            raise
        return handle

    async def execute(
        self,
        pipeline: Pipeline,
        request: PipelineRequest | None = None,
        *,
        input: Mapping[str, Any] | None = None,  # noqa: A002 - the documented name
    ) -> PipelineResponse:
        """Submit an execution and wait for its response (see `submit`)."""
        handle = await self.submit(pipeline, request, input=input)
        return await handle.wait()

    async def retry(
        self,
        run_id: str,
        *,
        from_failed: bool = False,
        pipeline: Pipeline | None = None,
        options: RequestOptions | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ExecutionHandle:
        """Run a recorded execution again, with the same input; returns the new execution's handle.

        With ``from_failed``, stages that succeeded in that run (and were not
        rolled back) are not run again: their recorded outputs are restored
        (``RequestOptions(restore=...)``). Stages whose output could not be
        recorded (not JSON-serialisable) run again. The new run is recorded
        with ``retry_of`` pointing at the old one.

        Args:
            run_id: The recorded run's id (in the engine's ``store``).
            from_failed: Skip what already succeeded.
            pipeline: The pipeline to run; by default the one this engine
                last ran under the recorded name.
            options: The new run's options (its ``restore`` is filled in).
            metadata: More request metadata. The recorded definition (if the
                record has a ``definition``) is carried over, so the retry
                can itself be retried.

        Raises:
            RuntimeError: If the engine has no store.
            LookupError: If the store has no such run.
            PipekitError: If no pipeline is given and the engine has not run
                one of that name, if the given one has another name, or if
                the run's input could not be recorded (not JSON-serialisable).
        """
        if self._store is None:
            raise RuntimeError("Engine.retry() needs a run history: Engine(store=...)")
        record = await self._store.get_run(run_id)
        if pipeline is None:
            pipeline = self._known.get(record.pipeline)
            if pipeline is None:
                raise PipekitError(
                    f"this engine has not run a pipeline named {record.pipeline!r}; pass it: retry(..., pipeline=...)"
                )
        elif pipeline.name != record.pipeline:
            raise PipekitError(f"run {record.id} is of pipeline {record.pipeline!r}, not {pipeline.name!r}")
        if not record.input_restorable:
            raise PipekitError(
                f"run {record.id} cannot be retried: its input was not JSON-serialisable, so not recorded"
            )
        restore = restorable_outputs(record, set(pipeline.stage_names)) if from_failed else {}
        carried: dict[str, str] = {}
        definition = getattr(record, "definition", None)
        if isinstance(definition, str):
            carried["pipekit.definition"] = definition
        request_type = getattr(record, "request_type", "")
        request = PipelineRequest(
            type=request_type if isinstance(request_type, str) else "",
            input=record.input,
            options=attrs.evolve(options or RequestOptions(), restore=restore),
            metadata={**carried, **(metadata or {}), "pipekit.trigger": "retry", "pipekit.retry_of": record.id},
        )
        return await self.submit(pipeline, request)

    # -- looking -----------------------------------------------------------------

    def get(self, id: str) -> ExecutionHandle:  # noqa: A002 - mirrors handle.id
        """Return the handle of a known execution.

        Raises:
            KeyError: Naming the id, if the engine does not know it (any more).
        """
        try:
            return self._handles[id]
        except KeyError:
            raise KeyError(f"no execution with id {id!r} in this engine") from None

    def list(self, status: Status | None = None) -> list[ExecutionHandle]:
        """Known executions, oldest first, optionally only those in ``status``."""
        handles = list(self._handles.values())
        if status is None:
            return handles
        return [h for h in handles if h.status is status]

    def events(self) -> EventStream:
        """Live events of every execution, from now until the engine closes.

        Subscribers never slow executions down: one that falls more than
        ``event_buffer`` events behind skips ahead, and is told (``.dropped``
        and a ``pipekit.events.dropped`` warning).
        """
        return self._events.stream(from_start=False)

    def metrics(self, pipeline: str) -> PipelineMetrics:
        """Counters and latency percentiles of the named pipeline's executions."""
        tally = self._tallies.get(pipeline)
        if tally is None or not tally.total:
            return PipelineMetrics(pipeline=pipeline, hook_failures=tally.hook_failures if tally else 0)
        durations = sorted(tally.durations)
        return PipelineMetrics(
            pipeline=pipeline,
            total_executions=tally.total,
            succeeded=tally.succeeded,
            failed=tally.total - tally.succeeded,
            timed_out=tally.timed_out,
            cancelled=tally.cancelled,
            success_rate=tally.succeeded / tally.total,
            p50=_percentile(durations, 50),
            p95=_percentile(durations, 95),
            p99=_percentile(durations, 99),
            hook_failures=tally.hook_failures,
        )

    @property
    def running(self) -> int:
        """Executions running now."""
        return self._running

    # -- bookkeeping ------------------------------------------------------------

    def _tally(self, name: str) -> _Tally:
        tally = self._tallies.get(name)
        if tally is None:
            tally = self._tallies[name] = _Tally(
                attributes={ATTR_PIPELINE: name}, durations=deque(maxlen=self._metrics_window)
            )
        return tally

    def _record(self, tally: _Tally, response: PipelineResponse, *, dry_run: bool) -> None:
        if dry_run:  # a check, not an execution (the instruments skip it too)
            return
        tally.total += 1
        status = response.status
        if status is Status.SUCCEEDED:
            tally.succeeded += 1
        elif status is Status.TIMED_OUT:
            tally.timed_out += 1
        elif status is Status.CANCELLED:
            tally.cancelled += 1
        tally.durations.append(response.duration)

    def _retire(self, handle: ExecutionHandle) -> None:
        self._finished.append(handle.id)
        while len(self._finished) > self._history_size:
            old = self._finished.popleft()
            self._handles.pop(old, None)

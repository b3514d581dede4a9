"""The runner: walks a pipeline's graph, then compensates on failure.

One `_Run` per execution holds all mutable state; the plan it walks is
shared and immutable. A chain of stages runs inline in one task; a task is
spawned only where the graph fans out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import types
from collections import ChainMap, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import anyio
import anyio.lowlevel
import structlog
from anyio.lowlevel import RunVar
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from . import _events as ev
from ._context import StageContext, _RunView, _Store
from ._errors import (
    PipekitError,
    PipelineCancelledError,
    PipelineDefinitionError,
    PipelineTimeoutError,
    RollbackError,
    RollbackTimeoutError,
    StageFailedError,
    StageTimeoutError,
    ValidationError,
)
from ._instrument import (
    ATTR_ATTEMPT,
    ATTR_DRY_RUN,
    ATTR_ERROR_TYPE,
    ATTR_PIPELINE,
    ATTR_REQUEST_ID,
    ATTR_REQUEST_TYPE,
    ATTR_RETRY_DELAY,
    ATTR_STATUS,
    Instruments,
    error_type,
    get_instruments,
    mark_error,
)
from ._plan import Node, Plan, compile_plan
from ._policy import call_with_retry
from ._request import PipelineRequest, PipelineResponse, StageResult
from ._status import Status

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ._pipeline import Hook, Pipeline, Validator

__all__ = ["Emitter", "collect_validation_errors", "execute_pipeline", "run_nested"]

_log = structlog.get_logger("pipekit")


#: Extra event listeners for every run started in this context
#: (`pipekit.testing.capture_events` sets it).
extra_listeners: ContextVar[tuple[Callable[[ev.Event], None], ...]] = ContextVar("pipekit_extra_listeners", default=())

#: The same for every run in the process (test fixtures, which do not share
#: the test's context, use it).
process_listeners: list[Callable[[ev.Event], None]] = []

_atomic_locks: RunVar[WeakKeyDictionary[Pipeline, anyio.Lock]] = RunVar("pipekit_atomic_locks")

_NO_IDS: Mapping[str, str] = MappingProxyType({})
_PENDING = Status.PENDING
_RUNNING = Status.RUNNING
_SUCCEEDED = Status.SUCCEEDED
_FAILED = Status.FAILED
_SKIPPED = Status.SKIPPED


class Emitter:
    """Delivers a run's events: synchronous listeners first, then async hooks.

    Listeners (the engine's history and broadcast) must not raise. A hook that
    raises or overruns ``hook_timeout`` is logged with its traceback and
    counted; it never breaks the run. A hook that overran is not called again
    for the rest of the run, so a hung hook delays a run (or its shielded
    cleanup) by one ``hook_timeout`` at most.
    """

    __slots__ = (
        "disabled",
        "failures",
        "hook_timeout",
        "hooks",
        "instruments",
        "listeners",
        "on_hook_failure",
        "root",
    )

    def __init__(
        self,
        hooks: Sequence[Hook] = (),
        listeners: Sequence[Callable[[ev.Event], None]] = (),
        on_hook_failure: Callable[[], None] | None = None,
        instruments: Instruments | None = None,
        *,
        hook_timeout: float = ev.DEFAULT_HOOK_TIMEOUT,
        root: str = "",
    ) -> None:
        self.hooks = tuple(hooks)
        self.listeners = tuple(listeners)
        self.failures = 0
        self.on_hook_failure = on_hook_failure
        self.instruments = instruments
        self.hook_timeout = hook_timeout
        self.disabled: set[int] = set()  # ids of hooks that overran
        self.root = root

    def extend(self, hooks: Sequence[Hook]) -> Emitter:
        """An emitter that also awaits ``hooks`` (a nested pipeline's own); failures count here too."""
        if not hooks:
            return self
        child = Emitter(
            (*self.hooks, *hooks),
            self.listeners,
            self._failed,
            self.instruments,
            hook_timeout=self.hook_timeout,
            root=self.root,
        )
        child.disabled = self.disabled  # a hook that overran stays off in nested runs too
        return child

    def _failed(self) -> None:
        self.failures += 1
        if self.on_hook_failure is not None:
            self.on_hook_failure()

    async def emit(self, event: ev.Event) -> None:
        for listener in self.listeners:
            listener(event)
        for hook in self.hooks:
            if id(hook) in self.disabled:
                continue
            try:
                with anyio.move_on_after(self.hook_timeout) as scope:
                    await hook(event)
                if scope.cancelled_caught:
                    self.disabled.add(id(hook))
                    raise TimeoutError(
                        f"hook took longer than {self.hook_timeout:g}s; it is not called again in this run"
                    )
            except Exception as exc:
                self._failed()
                if self.instruments is not None:
                    # Counted under the pipeline that was executed (the outermost one).
                    self.instruments.hook_failures.add(1, {ATTR_PIPELINE: self.root or event.pipeline})
                fields = {
                    "hook": getattr(hook, "__qualname__", repr(hook)),
                    "event_kind": event.kind,
                    "request_id": event.request_id,
                    "pipeline": event.pipeline,
                    "stage": event.stage,
                    **_span_ids(),
                }
                if isinstance(exc, PipekitError | TimeoutError):
                    # An expected failure (HttpHook gave up, the hook overran): one line says it all.
                    _log.warning("pipekit.hook.failed", error=f"{type(exc).__name__}: {exc}", **fields)
                else:
                    _log.exception("pipekit.hook.failed", **fields)


def _interrupted_reason(stop: str, culprit: str | None, timeout: float | None) -> str:
    if stop == "failed":
        return f"stage {culprit!r} failed"
    if stop == "timeout":
        return f"the run timed out after {timeout:g}s"
    return "the run was cancelled"


class _Run(_RunView):
    """All state of one execution of one pipeline (or of a nested pipeline)."""

    __slots__ = (
        "attempts",
        "blocked",
        "cancel_requested",
        "children",
        "culprit",
        "deadline",
        "debug",
        "definition_errors",
        "dry_run",
        "emitter",
        "error",
        "failure",
        "limiter",
        "log",
        "mono0",
        "nodes",
        "now",
        "orphan_hook_failures",
        "output",
        "outputs",
        "outputs_view",
        "parent_run",
        "pipeline",
        "pipeline_name",
        "plan",
        "queues",
        "reason",
        "request",
        "response",
        "restore",
        "restored",
        "rollback_error",
        "rollback_index",
        "rolled_back",
        "run_scope",
        "span",
        "start_index",
        "start_ns",
        "started",
        "starts",
        "status",
        "stop",
        "store",
        "t0",
        "t1",
        "tel",
        "tg",
        "tracing",
        "undos",
        "variables",
        "waiting",
        "wall0",
        "workers",
    )

    def __init__(
        self,
        pipeline: Pipeline,
        plan: Plan,
        request: PipelineRequest,
        emitter: Emitter | None,
        parent: _Run | None = None,
        *,
        instruments: Instruments | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.pipeline_name = pipeline.name
        self.plan = plan
        self.nodes = plan.nodes
        self.request = request
        self.dry_run = request.options.dry_run
        self.emitter: Emitter | None = emitter
        n = len(plan.nodes)
        self.status: list[Status] = [_PENDING] * n
        self.output: list[Any] = [None] * n
        self.error: list[BaseException | None] = [None] * n
        self.attempts = [0] * n
        self.t0 = [0.0] * n
        self.t1 = [0.0] * n
        self.started = [False] * n
        self.reason: list[str | None] = [None] * n
        self.blocked = [False] * n
        self.rolled_back = [False] * n
        self.rollback_error: list[BaseException | None] = [None] * n
        self.waiting = [len(node.deps) for node in plan.nodes]
        self.outputs: dict[str, Any] = {}
        if parent is None:
            self.outputs_view: Mapping[str, Any] = types.MappingProxyType(self.outputs)
            self.store = _Store(plan.concurrent)
            self.variables: Mapping[str, Any] = pipeline.variables
        else:
            self.variables = (
                types.MappingProxyType(ChainMap(pipeline.variables, parent.variables))  # type: ignore[arg-type]
                if pipeline.variables
                else parent.variables
            )
            self.outputs_view = types.MappingProxyType(ChainMap(self.outputs, parent.outputs_view))  # type: ignore[arg-type]
            self.store = _Store(plan.concurrent, parent.store)
        self.children: dict[int, _Run] = {}
        self.queues: dict[int, deque[int]] = {}
        self.workers: dict[int, int] = {}
        self.stop: str | None = None
        self.culprit: str | None = None
        self.failure: int = -1
        self.tg: anyio.abc.TaskGroup | None = None
        self.run_scope: anyio.CancelScope | None = None
        self.cancel_requested = False
        self.response: PipelineResponse | None = None
        self.deadline: float | None = None
        self.wall0 = 0.0
        self.mono0 = 0.0
        self.now: Callable[[], float] = anyio.current_time
        self.tel: Instruments | None = instruments if instruments is not None else (parent.tel if parent else None)
        self.tracing = False  # set once the run's span turns out to be recording
        self.span: trace.Span | None = None
        self.start_ns: list[int] = []
        self.log: Any = _log
        self.debug = False
        self.start_index: list[int | None] = [None] * n
        self.rollback_index: list[int | None] = [None] * n
        self.starts = 0
        self.undos = 0
        self.parent_run = parent
        self.orphan_hook_failures = 0  # failing hooks of nested pipelines when this run has no emitter
        self.definition_errors: list[ValidationError] = []
        # Outputs an earlier run recorded: those stages are not run again.
        self.restore: Mapping[str, Any] = request.options.restore if parent is None else {}
        self.restored: set[int] = set()
        # One limiter for the whole run tree: RequestOptions(max_parallel=...).
        max_parallel = request.options.max_parallel
        self.limiter: anyio.CapacityLimiter | None = (
            parent.limiter
            if parent is not None
            else None
            if max_parallel is None
            else anyio.CapacityLimiter(max_parallel)
        )

    # -- control ------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel the run from outside (the engine's ``handle.cancel()``)."""
        self.cancel_requested = True
        if self.run_scope is not None:
            self.run_scope.cancel()

    async def _emit(self, event: ev.Event) -> None:
        assert self.emitter is not None
        await self.emitter.emit(event)

    async def _emit_shielded(self, event: ev.Event) -> None:
        """Emit during clean-up: hooks (which may await) run shielded; listeners need no scope."""
        emitter = self.emitter
        assert emitter is not None
        if emitter.hooks:
            with anyio.CancelScope(shield=True):
                await emitter.emit(event)
        else:
            for listener in emitter.listeners:
                listener(event)

    def _now_wall(self, mono: float) -> float:
        return self.wall0 + (mono - self.mono0)

    def wall_time(self) -> float:
        """Now, as the run's events tell time (a fake clock moves it too); the wall clock before it started."""
        return self._now_wall(self.now()) if self.wall0 else time.time()

    # -- running ------------------------------------------------------------

    async def run(self) -> PipelineResponse:
        """Run to completion (rollback included) and return the response.

        The run happens inside its ``pipeline <name>`` span, a child of the
        current span (or of the request's ``carrier``). Cancellation from
        outside is honoured: the run is interrupted, compensated under a
        shield, its response kept in ``self.response``, and the cancellation
        re-raised.
        """
        request = self.request
        self.log = _log.bind(request_id=request.id, pipeline=self.pipeline_name)
        self.debug = _debug_enabled(self.log)
        tel = self.tel
        if tel is None:
            return await self._run()
        # Only the outermost run continues the caller's remote trace; a nested
        # run's parent is the nesting stage's span.
        parent = propagate.extract(request.carrier) if request.carrier and self.parent_run is None else None
        span = tel.tracer.start_span(
            f"pipeline {self.pipeline_name}",
            context=parent,
            attributes={
                ATTR_PIPELINE: self.pipeline_name,
                ATTR_REQUEST_ID: request.id,
                ATTR_REQUEST_TYPE: request.type,
                ATTR_DRY_RUN: self.dry_run,
            },
        )
        self.span = span
        if span.is_recording():
            self.tracing = True
            self.start_ns = [0] * len(self.nodes)
        # Unsampled traces still have valid ids worth logging (they join up
        # with the caller's logs); only a missing SDK gives invalid ones.
        self.log = self.log.bind(**_span_ids(span))
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            return await self._run()
        except BaseException as exc:
            if self.response is None:  # a bug, not a stage failure
                mark_error(span, exc)
            raise
        finally:
            otel_context.detach(token)
            if self.response is not None:
                self._end_run_span(span, self.response)
            else:
                span.end()

    def _end_run_span(self, span: trace.Span, response: PipelineResponse) -> None:
        if self.tracing:
            span.set_attribute(ATTR_STATUS, response.status.value)
            if response.error is not None:
                mark_error(span, response.error)
        span.end()

    async def _run(self) -> PipelineResponse:
        pipeline = self.pipeline
        self.now = _loop_clock()
        self.wall0 = time.time()
        self.mono0 = self.now()
        request = self.request
        limits = [t for t in (pipeline.timeout, request.options.timeout) if t is not None]
        self.deadline = min(limits) if limits else None
        self.log.info("pipekit.pipeline.started", request_type=request.type, dry_run=self.dry_run)
        cancelled_exc = anyio.get_cancelled_exc_class()
        lock: anyio.Lock | None = None
        try:
            try:
                # Everything that may wait -- the first hook, another run of
                # the same atomic pipeline, the stages -- happens inside the
                # run's scope, so cancel() and the deadline reach all of it.
                with anyio.CancelScope() as scope:
                    self.run_scope = scope
                    if self.cancel_requested:
                        scope.cancel()
                    if self.deadline is not None and not self.dry_run:
                        scope.deadline = self.mono0 + self.deadline
                    if self.emitter is not None:
                        await self._emit(
                            ev.PipelineStarted(
                                request_id=request.id,
                                pipeline=self.pipeline_name,
                                timestamp=self.wall0,
                                request_type=request.type,
                                parent=None if self.parent_run is None else self.parent_run.pipeline_name,
                                input=request.input,
                                metadata=request.metadata,
                                dry_run=self.dry_run,
                            )
                        )
                    if self.dry_run:
                        self.response = await self._finish_dry_run()
                        return self.response
                    if self.parent_run is None and self.plan.preflight and (problems := await self._preflight()):
                        self.response = await self._refuse(problems)
                        return self.response
                    if pipeline.serialised:
                        candidate = _atomic_lock(pipeline)
                        await candidate.acquire()
                        lock = candidate
                    await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled before a stage started
                    async with anyio.create_task_group() as tg:
                        self.tg = tg
                        first = self._dispatch(self.plan.roots)
                        if first >= 0:
                            await self._drive(first)
                if scope.cancelled_caught and self.stop is None:
                    self.stop = "cancelled" if self.cancel_requested else "timeout"
            except cancelled_exc:
                if self.stop is None:
                    self.stop = "cancelled"
                with anyio.CancelScope(shield=True):
                    self.response = await self._finish()
                raise
            self.response = await self._finish()
        finally:
            if lock is not None:
                lock.release()  # after the rollback: the next run sees a compensated world
        # A caller cancelled while the shielded rollback ran learns it now.
        await anyio.lowlevel.checkpoint_if_cancelled()
        return self.response

    async def _drive(self, i: int) -> None:
        """Run node ``i``, then keep going inline with one newly ready dependent."""
        while not self._stopping():
            await self._run_node(i)
            if self._stopping():
                return
            i = await self._release(i)
            if i < 0:
                return

    def _stopping(self) -> bool:
        return self.stop is not None

    async def _release(self, i: int) -> int:
        """Count node ``i`` as done for its dependents; start the ones now ready.

        Returns one ready node for the caller to run inline, or -1.
        """
        nodes = self.nodes
        waiting = self.waiting
        blocked = self.blocked
        inline = -1
        todo = [i]
        while todo:
            j = todo.pop()
            for d in nodes[j].dependents:
                w = waiting[d] - 1
                waiting[d] = w
                if w:
                    continue
                failed = next((k for k in nodes[d].deps if blocked[k]), -1)
                if failed >= 0:
                    dep = nodes[failed]
                    why = "failed" if self.status[failed] is not _SKIPPED else "was skipped after a failure"
                    await self._skip(d, f"dependency {dep.name!r} {why}", blocked=True)
                    todo.append(d)
                elif self.nodes[d].limit is not None:
                    self._enqueue_limited(d)
                elif inline < 0:
                    inline = d
                else:
                    assert self.tg is not None
                    self.tg.start_soon(self._drive, d)
        return inline

    def _dispatch(self, ready: Sequence[int]) -> int:
        """Start ``ready`` nodes; return one to run inline (or -1)."""
        inline = -1
        for i in ready:
            if self.nodes[i].limit is not None:
                self._enqueue_limited(i)
            elif inline < 0:
                inline = i
            else:
                assert self.tg is not None
                self.tg.start_soon(self._drive, i)
        return inline

    def _enqueue_limited(self, i: int) -> None:
        """Queue a member of a limited parallel group; its group runs at most ``limit`` workers."""
        group = self.nodes[i].group
        queue = self.queues.get(group)
        if queue is None:
            queue = self.queues[group] = deque()
        queue.append(i)
        busy = self.workers.get(group, 0)
        if busy < (self.nodes[i].limit or 1):
            self.workers[group] = busy + 1
            assert self.tg is not None
            self.tg.start_soon(self._group_worker, group)

    async def _group_worker(self, group: int) -> None:
        """Run queued members of one limited group, one at a time, until none is left."""
        queue = self.queues[group]
        try:
            while queue and not self._stopping():
                i = queue.popleft()
                await self._run_node(i)
                if self._stopping():
                    return
                follow = await self._release(i)
                if follow >= 0:
                    assert self.tg is not None
                    self.tg.start_soon(self._drive, follow)
        finally:
            self.workers[group] -= 1

    async def _skip(self, i: int, reason: str, *, blocked: bool) -> None:
        self.status[i] = _SKIPPED
        self.reason[i] = reason
        self.blocked[i] = blocked
        self._record_stage(self.nodes[i], _SKIPPED, None)
        if self.debug:
            self.log.debug("pipekit.stage.skipped", stage=self.nodes[i].name, reason=reason)
        if self.emitter is not None:
            await self._emit(
                ev.StageSkipped(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.now()),
                    stage=self.nodes[i].name,
                    reason=reason,
                )
            )

    async def _run_node(self, i: int) -> None:
        node = self.nodes[i]
        if self.restore and node.name in self.restore:
            await self._restore(i, node)
            return
        if node.when is not None:
            try:
                go = node.when(StageContext(self, node.name))
            except Exception as exc:
                self.t0[i] = self.t1[i] = self.now()
                self.started[i] = True
                ids = _NO_IDS
                if self.tracing:  # the failure belongs in the trace too
                    assert self.tel is not None
                    span = self.tel.tracer.start_span(
                        node.telemetry.span_name, attributes=node.telemetry.span_attributes
                    )
                    span.set_attributes({ATTR_STATUS: _FAILED.value, ATTR_ATTEMPT: 0})
                    mark_error(span, exc)
                    span.end()
                    ids = _span_ids(span)
                await self._fail(i, exc, ids)
                return
            if not go:
                await self._skip(i, "condition is false", blocked=False)
                return
        if self.limiter is not None and node.nested is None:
            # Nested pipelines take no slot: their stages do (no deadlock at 1).
            async with self.limiter:
                await self._attempt(i, node)
            return
        await self._attempt(i, node)

    async def _restore(self, i: int, node: Node) -> None:
        """Count stage ``i`` as succeeded with the output an earlier run recorded."""
        out = self.restore[node.name]
        self.status[i] = _SUCCEEDED
        self.output[i] = out
        self.outputs[node.name] = out
        self.restored.add(i)
        self.started[i] = True
        self.t0[i] = self.t1[i] = now = self.now()
        self.reason[i] = "restored from an earlier run"
        self.log.info("pipekit.stage.restored", stage=node.name)
        if self.emitter is not None:
            await self._emit(
                ev.StageSucceeded(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(now),
                    stage=node.name,
                    attempt=0,
                    output=out,
                    restored=True,
                )
            )

    async def _attempt(self, i: int, node: Node) -> None:
        self.status[i] = _RUNNING
        self.started[i] = True
        self.start_index[i] = self.starts
        self.starts += 1
        t0 = self.t0[i] = self.now()
        self.attempts[i] = 1
        ctx = StageContext(self, node.name)
        emitter = self.emitter
        span = token = None
        ids: Mapping[str, str] = _NO_IDS
        if self.tracing:
            assert self.tel is not None
            span = self.tel.tracer.start_span(node.telemetry.span_name, attributes=node.telemetry.span_attributes)
            if node.retry is not None:  # for the first attempt's span, written once a retry happens
                self.start_ns[i] = getattr(span, "start_time", None) or time.time_ns()
            token = otel_context.attach(trace.set_span_in_context(span))
            ctx._span = span
            if self.debug:
                ids = {"span_id": f"{span.get_span_context().span_id:016x}"}
        if self.debug:
            self.log.debug("pipekit.stage.started", stage=node.name, attempt=1, **ids)
        try:
            if emitter is not None:
                await emitter.emit(
                    ev.StageStarted(
                        request_id=self.request.id,
                        pipeline=self.pipeline_name,
                        timestamp=self._now_wall(t0),
                        stage=node.name,
                        attempt=1,
                    )
                )
            if node.validate is not None:
                node.validate(ctx)
            if node.direct:
                out = await node.stage.execute(ctx)
            elif node.retry is None:
                out = await self._call(i, node, ctx, 1)
            else:

                async def attempt(n: int) -> Any:
                    return await self._call(i, node, ctx, n)

                async def on_retry(n: int, delay: float, error: BaseException) -> None:
                    await self._retry_scheduled(i, n, delay, error, span)

                out = await call_with_retry(node.retry, attempt, on_retry)
        except Exception as exc:
            t1 = self.t1[i] = self.now()
            if anyio.current_effective_deadline() == -math.inf:
                # The stage raised while being cancelled (fail-fast, the run's
                # deadline, handle.cancel()): it was interrupted, not failed.
                self.error[i] = exc
                status = self._interrupted_status()
                if span is not None:
                    self._end_stage_span(span, token, status, self.attempts[i], exc)
                self._record_stage(node, status, t1 - t0)
                await anyio.lowlevel.checkpoint_if_cancelled()
                raise AssertionError("unreachable: the task is cancelled") from exc  # pragma: no cover
            if span is not None:
                self._end_stage_span(span, token, self._failed_status(node, exc), self.attempts[i], exc)
                ids = _span_ids(span)
            await self._fail(i, exc, ids)
            return
        except BaseException:
            t1 = self.t1[i] = self.now()
            status = self._interrupted_status()
            if span is not None:
                self._end_stage_span(span, token, status, self.attempts[i], None)
            self._record_stage(node, status, t1 - t0)
            raise
        t1 = self.t1[i] = self.now()
        self.status[i] = _SUCCEEDED
        self.output[i] = out
        self.outputs[node.name] = out
        if span is not None:
            self._end_stage_span(span, token, _SUCCEEDED, self.attempts[i], None)
        self._record_stage(node, _SUCCEEDED, t1 - t0)
        if self.debug:
            self.log.debug(
                "pipekit.stage.succeeded", stage=node.name, attempt=self.attempts[i], duration=t1 - t0, **ids
            )
        if emitter is not None:
            await emitter.emit(
                ev.StageSucceeded(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(t1),
                    stage=node.name,
                    attempt=self.attempts[i],
                    duration=t1 - t0,
                    output=out,
                )
            )

    def _end_stage_span(
        self, span: trace.Span, token: object, status: Status, attempts: int, error: BaseException | None
    ) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]
        span.set_attributes({ATTR_STATUS: status.value, ATTR_ATTEMPT: attempts})
        if error is not None:
            mark_error(span, error)
        elif status is Status.TIMED_OUT:
            # Interrupted by the run's deadline: an error in the trace too.
            span.set_attribute(ATTR_ERROR_TYPE, "pipekit.PipelineTimeoutError")
            span.set_status(trace.StatusCode.ERROR, "interrupted: the run timed out")
        span.end()

    def _record_stage(self, node: Node, status: Status, duration: float | None) -> None:
        tel = self.tel
        if tel is None:
            return
        attributes = node.telemetry.with_status(status)
        tel.stage_runs.add(1, attributes)
        if duration is not None:
            tel.stage_duration.record(duration, attributes)

    @staticmethod
    def _failed_status(node: Node, exc: BaseException) -> Status:
        # TIMED_OUT only for this stage's own timeout; a nested pipeline whose
        # inner stage timed out failed.
        return Status.TIMED_OUT if isinstance(exc, StageTimeoutError) and exc.stage == node.name else _FAILED

    def _interrupted_status(self) -> Status:
        """The status of a stage interrupted right now: TIMED_OUT when the run's deadline passed."""
        scope = self.run_scope
        if self.stop == "timeout" or (
            self.stop is None and scope is not None and scope.cancel_called and not self.cancel_requested
        ):
            return Status.TIMED_OUT
        return Status.CANCELLED

    async def _retry_scheduled(
        self, i: int, attempt: int, delay: float, error: BaseException, span: trace.Span | None
    ) -> None:
        node = self.nodes[i]
        self.log.warning(
            "pipekit.stage.retry_scheduled",
            stage=node.name,
            attempt=attempt,
            delay=delay,
            error=repr(error),
            **({"span_id": f"{span.get_span_context().span_id:016x}"} if span is not None else _NO_IDS),
        )
        tel = self.tel
        if tel is not None:
            tel.retries.add(1, node.telemetry.base)
        if span is not None:
            assert tel is not None
            if attempt == 1:
                # The first attempt ran before anyone knew it would be retried:
                # give it its span now, with its real start time.
                first = tel.tracer.start_span(
                    f"stage {node.name} attempt 1",
                    start_time=self.start_ns[i],
                    attributes={**node.telemetry.base, ATTR_ATTEMPT: 1},
                )
                mark_error(first, error)
                first.end()
            span.add_event(
                "retry",
                {
                    ATTR_ATTEMPT: attempt,
                    ATTR_RETRY_DELAY: delay,
                    ATTR_ERROR_TYPE: error_type(error),
                    "exception.message": str(error),
                },
            )
        if self.emitter is not None:
            await self.emitter.emit(
                ev.StageRetrying(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.now()),
                    stage=node.name,
                    attempt=attempt,
                    error=error,
                    delay=delay,
                )
            )

    async def _call(self, i: int, node: Node, ctx: StageContext, n: int) -> Any:
        ctx._attempt = n
        self.attempts[i] = n
        if n > 1:
            ctx._log = None  # rebind with the new attempt
            if self.tracing:
                return await self._call_in_attempt_span(i, node, ctx, n)
        return await self._bounded(i, node, ctx, n)

    async def _bounded(self, i: int, node: Node, ctx: StageContext, n: int) -> Any:
        """One attempt, bounded by the stage's timeout."""
        coro = self._run_child(i, node, ctx) if node.nested is not None else node.stage.execute(ctx)
        if node.timeout is None:
            return await coro
        try:
            with anyio.move_on_after(node.timeout) as scope:
                return await coro
        except Exception as exc:
            if scope.cancel_called:
                # The stage raised while being interrupted by its timeout: it
                # still timed out, and its error is the cause.
                raise StageTimeoutError(node.name, timeout=node.timeout, attempts=n) from exc
            raise
        assert scope.cancelled_caught
        raise StageTimeoutError(node.name, timeout=node.timeout, attempts=n)

    async def _call_in_attempt_span(self, i: int, node: Node, ctx: StageContext, n: int) -> Any:
        assert self.tel is not None
        span = self.tel.tracer.start_span(
            f"stage {node.name} attempt {n}", attributes={**node.telemetry.base, ATTR_ATTEMPT: n}
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        stage_span, ctx._span = ctx._span, span
        try:
            return await self._bounded(i, node, ctx, n)
        except Exception as exc:
            mark_error(span, exc)
            raise
        finally:
            ctx._span = stage_span
            otel_context.detach(token)
            span.end()

    async def _run_child(self, i: int, node: Node, ctx: StageContext) -> Any:
        assert node.nested is not None
        child = _Run(node.nested, node.nested.plan(), self.request, _child_emitter(self, node.nested), parent=self)
        self.children[i] = child
        return await _finish_child(child, node.name)

    async def _fail(self, i: int, exc: Exception, ids: Mapping[str, str] = MappingProxyType({})) -> None:
        node = self.nodes[i]
        status = self._failed_status(node, exc)
        self._record_stage(node, status, self.t1[i] - self.t0[i])
        self.status[i] = status
        self.error[i] = exc
        self.blocked[i] = True
        if not node.continue_on_error and self.stop is None:
            self.stop = "failed"
            self.culprit = node.name
            self.failure = i
            assert self.tg is not None
            self.tg.cancel_scope.cancel()
        self.log.warning(
            "pipekit.stage.failed",
            stage=node.name,
            attempt=self.attempts[i],
            status=status.value,
            error=repr(exc),
            continue_on_error=node.continue_on_error,
            **ids,
        )
        if self.emitter is not None:
            await self._emit_shielded(
                ev.StageFailed(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.t1[i]),
                    stage=node.name,
                    attempt=self.attempts[i],
                    error=exc,
                    status=status,
                    duration=self.t1[i] - self.t0[i],
                )
            )

    # -- finishing ----------------------------------------------------------

    async def _finish(self) -> PipelineResponse:
        """Settle unfinished stages, compensate if needed, build the response."""
        stop = self.stop
        if stop is not None:
            await self._settle(stop)
            if self.pipeline.rollback_enabled:
                with anyio.CancelScope(shield=True):
                    await self.compensate()
        return await self._respond()

    async def _settle(self, stop: str) -> None:
        reason = _interrupted_reason(stop, self.culprit, self.deadline)
        status = self.status
        for i, node in enumerate(self.nodes):
            s = status[i]
            if s is _RUNNING:
                status[i] = Status.TIMED_OUT if stop == "timeout" else Status.CANCELLED
                self.reason[i] = f"interrupted: {reason}"
                self.log.info(
                    "pipekit.stage.cancelled", stage=node.name, attempt=self.attempts[i], status=status[i].value
                )
                if self.emitter is not None:
                    await self._emit_shielded(
                        ev.StageCancelled(
                            request_id=self.request.id,
                            pipeline=self.pipeline_name,
                            timestamp=self._now_wall(self.t1[i]),
                            stage=node.name,
                            attempt=self.attempts[i],
                            status=status[i],
                            reason=self.reason[i] or "",
                        )
                    )
            elif s is _PENDING:
                with anyio.CancelScope(shield=True):
                    await self._skip(i, f"not started: {reason}", blocked=True)

    def _compensation_order(self) -> dict[int, list[int]]:
        """Completed, compensable nodes mapped to the ones to undo before each."""
        nodes = self.nodes
        todo = {
            i
            for i in range(len(nodes))
            if self.status[i] is _SUCCEEDED and nodes[i].compensable and i not in self.restored
        }
        # reach[j]: the nearest compensable descendants of j (j itself when it
        # is one). Walking the topological order backwards, every dependent is
        # done before the node itself: no recursion, however long the chain.
        reach: dict[int, frozenset[int]] = {}
        order: dict[int, list[int]] = {}
        for i in reversed(self.plan.order):
            below = frozenset().union(*(reach[d] for d in nodes[i].dependents))
            if i in todo:
                order[i] = sorted(below)
                reach[i] = frozenset((i,))
            else:
                reach[i] = below
        return order

    async def compensate(self) -> list[BaseException]:
        """Roll back completed stages in reverse dependency order.

        A stage is undone only after everything depending on it; independent
        branches concurrently. Bounded by the pipeline's rollback timeout; the
        caller shields it. Returns the rollback errors.
        """
        order = self._compensation_order()
        if not order:
            return []
        nodes = self.nodes
        self.log.info("pipekit.rollback.started", stages=[nodes[i].name for i in order], **_span_ids())
        if self.tel is not None:
            for i in order:  # counted when scheduled, so failures (timeouts included) never exceed it
                self.tel.rollbacks.add(1, nodes[i].telemetry.base)
        if self.emitter is not None:
            await self._emit(
                ev.RollbackStarted(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.now()),
                    stages=tuple(nodes[i].name for i in order),
                )
            )
        # Like the forward run: a chain is undone inline in one task, a task
        # is spawned only where independent branches can be undone together.
        pending = {i: len(before) for i, before in order.items()}
        unblocks: dict[int, list[int]] = {i: [] for i in order}
        for i, before in order.items():
            for j in before:
                unblocks[j].append(i)
        started: set[int] = set()
        timeout = self.pipeline.rollback_timeout
        try:
            with anyio.move_on_after(timeout):
                async with anyio.create_task_group() as tg:
                    ready = [i for i, count in pending.items() if not count]
                    for i in ready[1:]:
                        tg.start_soon(self._undo_chain, i, pending, unblocks, started, tg)
                    await self._undo_chain(ready[0], pending, unblocks, started, tg)
        finally:
            # Also when an enclosing rollback's timeout cut this one short (a
            # nested pipeline's): every unfinished rollback is recorded.
            with anyio.CancelScope(shield=True):
                errors = await self._record_compensation(order, started, timeout)
        return errors

    async def _record_compensation(
        self, order: dict[int, list[int]], started: set[int], rollback_timeout: float
    ) -> list[BaseException]:
        nodes = self.nodes
        errors: list[BaseException] = []
        unfinished = {i for i in order if not self.rolled_back[i] and self.rollback_error[i] is None}
        for i, before in order.items():
            if i in unfinished:
                waiting = [nodes[j].name for j in before if j in unfinished] if i not in started else []
                self.rollback_error[i] = RollbackTimeoutError(
                    nodes[i].name, timeout=rollback_timeout, waiting_for=waiting
                )
                await self._rollback_failed(i)
            if self.rollback_error[i] is not None:
                errors.append(self.rollback_error[i])  # type: ignore[arg-type]
        self.log.info("pipekit.rollback.finished", rolled_back=sum(self.rolled_back), failed=len(errors), **_span_ids())
        if self.emitter is not None:
            await self._emit(
                ev.RollbackFinished(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.now()),
                    rolled_back=sum(self.rolled_back),
                    failed=len(errors),
                )
            )
        return errors

    async def _undo_chain(
        self,
        i: int,
        pending: dict[int, int],
        unblocks: dict[int, list[int]],
        started: set[int],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        """Undo ``i``, then whatever it unblocks: one inline, the rest in new tasks."""
        while True:
            await self._undo(i, started)
            follow = -1
            for k in unblocks[i]:
                pending[k] -= 1
                if pending[k]:
                    continue
                if follow < 0:
                    follow = k
                else:
                    tg.start_soon(self._undo_chain, k, pending, unblocks, started, tg)
            if follow < 0:
                return
            i = follow

    async def _undo(self, i: int, started: set[int]) -> None:
        node = self.nodes[i]
        span = token = None
        started.add(i)
        try:
            tel = self.tel
            if tel is not None and self.tracing:
                span = tel.tracer.start_span(
                    node.telemetry.rollback_span_name, attributes=node.telemetry.span_attributes
                )
                token = otel_context.attach(trace.set_span_in_context(span))
            try:
                if node.nested is not None:
                    child = self.children[i]
                    errors = await child.compensate()
                    if errors:
                        raise RollbackError(f"rollback of nested pipeline {node.name!r} failed", errors)  # type: ignore[arg-type]
                else:
                    assert node.rollback is not None
                    await node.rollback(StageContext(self, node.name, self.attempts[i]))
            except Exception as exc:
                self.rollback_error[i] = exc
                self.rollback_index[i] = self.undos
                self.undos += 1
                if span is not None:
                    mark_error(span, exc)
                await self._rollback_failed(i)
            else:
                self.rollback_index[i] = self.undos
                self.undos += 1
                self.rolled_back[i] = True
                self.status[i] = Status.ROLLED_BACK
                self.log.info("pipekit.rollback.stage_rolled_back", stage=node.name, **_span_ids())
                if self.emitter is not None:
                    await self._emit(
                        ev.StageRolledBack(
                            request_id=self.request.id,
                            pipeline=self.pipeline_name,
                            timestamp=self._now_wall(self.now()),
                            stage=node.name,
                            attempt=self.attempts[i],
                        )
                    )
        finally:
            if span is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
                if not self.rolled_back[i] and self.rollback_error[i] is None:
                    span.set_status(trace.StatusCode.ERROR, "rollback timed out")
                    span.set_attribute(ATTR_ERROR_TYPE, "TimeoutError")
                span.end()

    async def _rollback_failed(self, i: int) -> None:
        node = self.nodes[i]
        error = self.rollback_error[i]
        # A nested pipeline's failed rollbacks were counted by its own run.
        if self.tel is not None and node.nested is None:
            self.tel.rollback_failures.add(1, node.telemetry.base)
        self.log.error("pipekit.rollback.failed", stage=node.name, error=repr(error), exc_info=error, **_span_ids())
        if self.emitter is not None:
            await self._emit(
                ev.StageRollbackFailed(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(self.now()),
                    stage=node.name,
                    attempt=self.attempts[i],
                    error=error,
                )
            )

    def _run_error(self) -> PipekitError | None:
        stop = self.stop
        if stop is None:
            return None
        if stop == "failed":
            i = self.failure
            cause = self.error[i]
            if isinstance(cause, StageTimeoutError) and cause.stage == self.nodes[i].name:
                return cause
            message = None
            if self.attempts[i] == 0:
                message = f"stage {self.nodes[i].name!r} failed before it started"
            elif isinstance(cause, ValidationError):
                name = self.nodes[i].name
                detail = str(cause).removeprefix(f"stage {name!r}: ")  # the stage is named once
                message = f"stage {name!r} failed validation: {detail}"
            elif cause is not None:
                # Say why in the run's error, not only in its __cause__.
                n = self.attempts[i]
                message = (
                    f"stage {self.nodes[i].name!r} failed after {n} attempt{'' if n == 1 else 's'}: "
                    f"{type(cause).__name__}: {_first_line(cause)}"
                )
            error = StageFailedError(self.nodes[i].name, attempts=self.attempts[i], message=message)
            error.__cause__ = cause
            return error
        if stop == "timeout":
            assert self.deadline is not None
            return PipelineTimeoutError(self.pipeline_name, timeout=self.deadline, request_id=self.request.id)
        return PipelineCancelledError(self.pipeline_name, request_id=self.request.id)

    async def _respond(self, error: PipekitError | None = None) -> PipelineResponse:
        end = self.now()
        if error is None:
            error = self._run_error()
        rollback_errors = [e for e in self.rollback_error if e is not None]
        if error is not None and rollback_errors:
            group = RollbackError(
                f"{len(rollback_errors)} rollback(s) failed in pipeline {self.pipeline_name!r}",
                rollback_errors,  # type: ignore[arg-type]
            )
            error.rollback_error = group
            error.add_note(f"rollback also failed: {group}")
        if error is None:
            status = _SUCCEEDED
        elif self.stop == "timeout" or (self.stop == "failed" and isinstance(error, StageTimeoutError)):
            status = Status.TIMED_OUT
        elif self.stop == "cancelled":
            status = Status.CANCELLED
        else:
            status = _FAILED
        duration = end - self.mono0
        tel = self.tel
        if tel is not None and not self.dry_run and self.parent_run is None:
            # Executions are what callers ran; nested pipelines are stages of them.
            attributes = self.plan.telemetry.with_status(status)
            tel.executions.add(1, attributes)
            tel.execution_duration.record(duration, attributes)
        if error is None:
            self.log.info("pipekit.pipeline.finished", status=status.value, duration=duration)
        else:
            self.log.warning(
                "pipekit.pipeline.finished",
                status=status.value,
                duration=duration,
                error=f"{type(error).__name__}: {error}",
            )
        if self.emitter is not None:
            await self._emit_shielded(
                ev.PipelineFinished(
                    request_id=self.request.id,
                    pipeline=self.pipeline_name,
                    timestamp=self._now_wall(end),
                    error=error,
                    status=status,
                    duration=duration,
                    parent=None if self.parent_run is None else self.parent_run.pipeline_name,
                )
            )
        keep = error is None or self.pipeline.keeps_partial_outputs
        wall0, mono0 = self.wall0, self.mono0
        outputs = types.MappingProxyType(dict(self.outputs) if keep else {})
        response = PipelineResponse(
            id=self.request.id,
            pipeline=self.pipeline_name,
            status=status,
            stages=_StageResults(self, keep=keep),
            outputs=outputs,
            error=error,
            started_at=datetime.fromtimestamp(wall0, UTC),
            finished_at=datetime.fromtimestamp(wall0 + end - mono0, UTC),
            duration=duration,
            hook_failures=(self.emitter.failures if self.emitter is not None else 0) + self.orphan_hook_failures,
        )
        return response

    # -- dry run ------------------------------------------------------------

    async def _preflight(self) -> list[ValidationError]:
        """Run the validators of this pipeline and of every pipeline nested in it."""
        found: list[ValidationError] = []
        for view, validator in _all_validators(self, set()):
            # A nested pipeline's validators see that pipeline (its name, its variables over the outer ones).
            try:
                await validator.validate(StageContext(view, view.pipeline_name))
            except ValidationError as exc:
                found.extend(exc.errors or [exc])
            except Exception as exc:
                wrapped = ValidationError(f"validator {validator!r} raised {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                found.append(wrapped)
        return found

    async def _refuse(self, problems: list[ValidationError]) -> PipelineResponse:
        """End a run whose pre-flight validation failed: nothing executes."""
        for i in range(len(self.nodes)):
            self.status[i] = _SKIPPED
            self.reason[i] = "pre-flight validation failed"
        self.stop = "failed"
        plural = "problem" if len(problems) == 1 else "problems"
        return await self._respond(
            ValidationError(
                f"pre-flight validation of pipeline {self.pipeline_name!r} found {len(problems)} {plural}: "
                + "; ".join(str(e) for e in problems),
                errors=problems,
            )
        )

    async def _finish_dry_run(self) -> PipelineResponse:
        errors: list[ValidationError] = list(self.definition_errors)
        if self.parent_run is None:
            errors.extend(await self._preflight())
        for i in self.plan.order:
            node = self.nodes[i]
            found = _validate_node(self, node)
            if found:
                self.status[i] = _FAILED
                self.error[i] = (
                    found[0]
                    if len(found) == 1
                    else ValidationError("; ".join(map(str, found)), stage=node.name, errors=found)
                )
                errors.extend(found)
            else:
                self.status[i] = _SKIPPED
                self.reason[i] = "dry run"
        error = None
        if errors:
            plural = "problem" if len(errors) == 1 else "problems"
            error = ValidationError(
                f"dry run of pipeline {self.pipeline_name!r} found {len(errors)} {plural}: "
                + "; ".join(str(e) for e in errors),
                errors=errors,
            )
            self.stop = "failed"
        return await self._respond(error)


def _all_validators(run: _Run, seen: set[int]) -> list[tuple[_Run, Validator]]:
    """The validators of ``run``'s pipeline, then those of the pipelines nested in it (each pipeline once).

    Each comes with the run (a view, for a nested pipeline) its context is made from.
    """
    from ._pipeline import Pipeline  # noqa: PLC0415 - avoids an import cycle

    pipeline = run.pipeline
    seen.add(id(pipeline))
    found = [(run, v) for v in pipeline.validators]
    for entry in pipeline.entries:
        nested = entry.stage
        if isinstance(nested, Pipeline) and id(nested) not in seen and nested.plan().preflight:
            view = _Run(nested, nested.plan(), run.request, _child_emitter(run, nested), parent=run)
            found.extend(_all_validators(view, seen))
    return found


def _first_line(exc: BaseException) -> str:
    """``str(exc)``'s first line, shortened: error messages of stages can be long."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _root_name(run: _Run) -> str:
    while run.parent_run is not None:
        run = run.parent_run
    return run.pipeline_name


def _span_ids(span: trace.Span | None = None) -> Mapping[str, str]:
    """``trace_id``/``span_id`` log fields of ``span`` (the current span by default), if it has valid ones."""
    span_context = (span if span is not None else trace.get_current_span()).get_span_context()
    if not span_context.is_valid:
        return _NO_IDS
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


class _StageResults(Mapping[str, StageResult]):
    """The per-stage results of a finished run, built when first looked at.

    Most callers read a few stages (or none); building every `StageResult`
    eagerly cost more than running a no-op stage.
    """

    __slots__ = (
        "_attempts",
        "_built",
        "_error",
        "_index",
        "_keep",
        "_mono0",
        "_names",
        "_output",
        "_reason",
        "_rollback_error",
        "_rollback_index",
        "_rolled_back",
        "_start_index",
        "_started",
        "_status",
        "_t0",
        "_t1",
        "_wall0",
    )

    def __init__(self, run: _Run, *, keep: bool) -> None:
        # Copies of the per-stage state only: a response must not keep the
        # run (its context values, tasks, event buffers) alive.
        self._names = tuple(node.name for node in run.nodes)
        self._index = run.plan.index
        self._status = list(run.status)
        self._output = list(run.output) if keep else None
        self._error = list(run.error)
        self._attempts = list(run.attempts)
        self._started = list(run.started)
        self._t0, self._t1 = list(run.t0), list(run.t1)
        self._reason = list(run.reason)
        self._rolled_back = list(run.rolled_back)
        self._rollback_error = list(run.rollback_error)
        self._start_index = list(run.start_index)
        self._rollback_index = list(run.rollback_index)
        self._wall0, self._mono0 = run.wall0, run.mono0
        self._keep = keep
        self._built: dict[int, StageResult] = {}

    def __getitem__(self, name: str) -> StageResult:
        i = self._index[name]
        found = self._built.get(i)
        if found is None:
            found = self._built[i] = self._build(i)
        return found

    def _build(self, i: int) -> StageResult:
        started = self._started[i]
        wall0, mono0 = self._wall0, self._mono0
        return StageResult(
            name=self._names[i],
            status=self._status[i],
            output=self._output[i] if self._output is not None else None,
            error=self._error[i],
            attempts=self._attempts[i],
            started_at=datetime.fromtimestamp(wall0 + self._t0[i] - mono0, UTC) if started else None,
            finished_at=datetime.fromtimestamp(wall0 + self._t1[i] - mono0, UTC) if started else None,
            duration=max(self._t1[i] - self._t0[i], 0.0) if started else 0.0,
            rolled_back=self._rolled_back[i],
            rollback_error=self._rollback_error[i],
            reason=self._reason[i],
            start_index=self._start_index[i],
            rollback_index=self._rollback_index[i],
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self) -> tuple[type[dict[str, StageResult]], tuple[dict[str, StageResult]]]:
        return dict, (dict(self.items()),)


def _loop_clock() -> Callable[[], float]:
    """What ``anyio.current_time()`` reads, without its per-call dispatch.

    The library is the one anyio (through sniffio) says is running, so trio in
    guest mode on an asyncio host still gets trio's clock, the one its cancel
    scopes' deadlines are compared against.
    """
    try:
        import sniffio  # noqa: PLC0415 - anyio's own way of telling the libraries apart

        library = sniffio.current_async_library()
    except Exception:
        return anyio.current_time
    if library == "asyncio":
        return asyncio.get_running_loop().time
    if library == "trio":
        import trio  # noqa: PLC0415 - only when running on trio

        return trio.current_time
    return anyio.current_time  # pragma: no cover - another anyio backend


def _atomic_lock(pipeline: Pipeline) -> anyio.Lock:
    """The lock serialising runs of one atomic pipeline value, in this event loop."""
    locks = _atomic_locks.get(None)
    if locks is None:
        locks = WeakKeyDictionary()
        _atomic_locks.set(locks)
    lock = locks.get(pipeline)
    if lock is None:
        lock = locks[pipeline] = anyio.Lock()
    return lock


def _debug_enabled(logger: Any) -> bool:
    """Whether ``logger`` would emit debug events (checked once per run, to keep stages cheap)."""
    check = getattr(logger, "is_enabled_for", None)
    if check is None:
        check = getattr(logger, "isEnabledFor", None)
    if check is None:
        return True
    return bool(check(logging.DEBUG))


def _child_emitter(parent: _Run, nested: Pipeline) -> Emitter | None:
    if parent.emitter is not None:
        return parent.emitter.extend(nested.hooks)
    if not nested.hooks:
        return None

    def count() -> None:
        parent.orphan_hook_failures += 1

    return Emitter(nested.hooks, (), count, parent.tel, root=_root_name(parent))


def _validate_node(run: _RunView, node: Node) -> list[ValidationError]:
    """Call one stage's validate, flattening aggregated errors."""
    if node.nested is not None:
        return collect_validation_errors(node.nested, StageContext(run, node.name))
    if node.validate is None:
        return []
    try:
        node.validate(StageContext(run, node.name))
    except ValidationError as exc:
        if exc.errors:
            return list(exc.errors)
        if exc.stage is None:
            exc.stage = node.name
        if not str(exc).startswith(f"stage {node.name!r}"):
            wrapped = ValidationError(f"stage {node.name!r}: {exc}", stage=node.name)
            wrapped.__cause__ = exc
            return [wrapped]
        return [exc]
    except Exception as exc:
        wrapped = ValidationError(f"stage {node.name!r}: validate raised {type(exc).__name__}: {exc}", stage=node.name)
        wrapped.__cause__ = exc
        return [wrapped]
    return []


def collect_validation_errors(pipeline: Pipeline, ctx: StageContext) -> list[ValidationError]:
    """Validate every stage of ``pipeline`` as seen from ``ctx`` (a nesting stage)."""
    parent = ctx._run
    try:
        plan = pipeline.plan()
    except PipelineDefinitionError as exc:
        return [ValidationError(str(exc), stage=pipeline.name)]
    view = _Run(pipeline, plan, parent.request, None, parent=parent if isinstance(parent, _Run) else None)
    errors: list[ValidationError] = []
    for i in plan.order:
        errors.extend(_validate_node(view, plan.nodes[i]))
    return errors


async def execute_pipeline(
    pipeline: Pipeline,
    request: PipelineRequest,
    *,
    hooks: Sequence[Hook] = (),
    listeners: Sequence[Callable[[ev.Event], None]] = (),
    on_hook_failure: Callable[[], None] | None = None,
    on_start: Callable[[_Run], None] | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    hook_timeout: float = ev.DEFAULT_HOOK_TIMEOUT,
    instruments: Instruments | None = None,
) -> PipelineResponse:
    """Run ``pipeline`` for ``request`` and return the response (the public entry point)."""
    definition_errors: list[ValidationError] = []
    try:
        plan = pipeline.plan()
    except PipelineDefinitionError as exc:
        if not request.options.dry_run:
            raise
        # A dry run reports a broken definition with everything else it finds.
        problem = ValidationError(str(exc))
        problem.__cause__ = exc
        definition_errors.append(problem)
        plan = compile_plan(pipeline, lenient=True)
    if instruments is None:
        instruments = get_instruments(tracer_provider, meter_provider)
    all_hooks = (*pipeline.hooks, *hooks)
    listeners = (*listeners, *extra_listeners.get(), *process_listeners)
    emitter = (
        Emitter(all_hooks, listeners, on_hook_failure, instruments, hook_timeout=hook_timeout, root=pipeline.name)
        if (all_hooks or listeners)
        else None
    )
    run = _Run(pipeline, plan, request, emitter, instruments=instruments)
    run.definition_errors = definition_errors
    if on_start is not None:
        on_start(run)
    return await run.run()


async def run_nested(pipeline: Pipeline, ctx: StageContext) -> Mapping[str, Any]:
    """Run ``pipeline`` as a stage of the run ``ctx`` belongs to."""
    parent = ctx._run
    if not isinstance(parent, _Run):  # pragma: no cover - contexts come from runs
        raise TypeError("a nested pipeline needs a context made by pipekit")
    child = _Run(pipeline, pipeline.plan(), parent.request, _child_emitter(parent, pipeline), parent=parent)
    # The calling stage holds a max_parallel slot: its inner stages run within
    # it (taking more would fail in its task, or deadlock at max_parallel=1).
    child.limiter = None
    return await _finish_child(child, ctx.stage)


async def _finish_child(child: _Run, stage: str) -> dict[str, Any]:
    """Run a nested pipeline and hand its context writes to the parent."""
    response = await child.run()
    if response.error is not None:
        raise response.error
    try:
        child.store.merge_into_parent(stage)
    except Exception:
        # The nested run succeeded but its results cannot be kept: undo it, as
        # the nesting stage now counts as failed.
        if child.pipeline.rollback_enabled:
            with anyio.CancelScope(shield=True):
                await child.compensate()
        raise
    return dict(response.outputs)

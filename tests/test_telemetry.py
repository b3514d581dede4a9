"""OpenTelemetry spans and metrics and structlog logs of runs, captured with `pipekit.testing`."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, Sum
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanContext, StatusCode, Tracer

import pipekit as pk
from pipekit.telemetry import INSTRUMENTS
from pipekit.testing import (
    FakeClock,
    MockStage,
    MockStageError,
    SpanCapture,
    assert_rolled_back,
    assert_span_tree,
    capture_logs,
    capture_spans,
)

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = "pipekit.pipeline.name"
REQUEST_ID = "pipekit.request.id"
REQUEST_TYPE = "pipekit.request.type"
DRY_RUN = "pipekit.dry_run"
STAGE = "pipekit.stage.name"
ATTEMPT = "pipekit.attempt"
STATUS = "pipekit.status"
DEPENDS_ON = "pipekit.stage.depends_on"
RETRY_DELAY = "pipekit.retry.delay"
ERROR_TYPE = "error.type"

REMOTE_TRACE = "0af7651916cd43dd8448eb211c80319c"
REMOTE_SPAN = "b7ad6b7169203331"

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")

StageFunction = Callable[[pk.StageContext], Awaitable[Any]]
UndoFunction = Callable[[pk.StageContext], Awaitable[None]]

#: A jitter-free policy: retries after 0.5 s, then 1.0 s (use it on the fake clock).
RETRY = pk.RetryPolicy(max_attempts=3, initial_delay=0.5, multiplier=2, jitter=0)

#: The fake clock on the backends conftest.py runs every test on (asyncio in debug mode, trio).
on_fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])


# -- errors and stages -------------------------------------------------------------


class BoomError(Exception):
    """The failure a test stage raises."""


class UndoError(Exception):
    """The failure a test rollback raises."""


def qualified(cls: type[BaseException]) -> str:
    """The ``error.type`` pipekit should record for ``cls``: its fully qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def planned_failure(stage: str, call: int, of: int) -> str:
    """The message of a `MockStage`'s planned failure (``fail_times``)."""
    return f"{stage} failed as planned (call {call} of {of})"


def make(name: str, fn: StageFunction, *, undo: UndoFunction | None = None) -> pk.FunctionStage:
    """A stage running ``fn`` (and rolling back with ``undo``, when given)."""
    return pk.FunctionStage(name=name, fn=fn, rollback_fn=undo)


# -- spans ---------------------------------------------------------------------------


def context_of(span: ReadableSpan) -> SpanContext:
    """The span's own context."""
    context = span.context
    assert isinstance(context, SpanContext)
    return context


def attributes(span: ReadableSpan) -> dict[str, Any]:
    """The span's attributes as a plain dict."""
    return dict(span.attributes or {})


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """The span's trace id and span id as lowercase hex, as logs carry them."""
    context = context_of(span)
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def trace_ids(spans: SpanCapture) -> set[int]:
    """The trace ids the captured spans belong to."""
    return {context_of(span).trace_id for span in spans.spans}


def user_tracer(spans: SpanCapture) -> Tracer:
    """A tracer on the capture's provider, for spans opened by "user code"."""
    return spans.tracer_provider.get_tracer("tests.user")


# -- running with the captured providers ---------------------------------------------


async def execute(
    spans: SpanCapture,
    pipeline: pk.Pipeline,
    request: pk.PipelineRequest | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> pk.PipelineResponse:
    """Run ``pipeline`` with the capture's providers (or those given), bounded by 5 s."""
    with anyio.fail_after(5):
        return await pipeline.execute(
            request,
            tracer_provider=spans.tracer_provider if tracer_provider is None else tracer_provider,
            meter_provider=spans.meter_provider if meter_provider is None else meter_provider,
        )


def engine_for(spans: SpanCapture, *, meter_provider: MeterProvider | None = None, **options: Any) -> pk.Engine:
    """An engine recording to the capture's providers (or the meter provider given)."""
    return pk.Engine(
        tracer_provider=spans.tracer_provider,
        meter_provider=spans.meter_provider if meter_provider is None else meter_provider,
        **options,
    )


MetricPoints = list[tuple[dict[str, Any], Any]]


def totals(points: MetricPoints, *keys: str) -> dict[tuple[Any, ...], float]:
    """Metric points (``SpanCapture.metric_points``: value, or histogram count) summed by the attributes ``keys``."""
    found: dict[tuple[Any, ...], float] = {}
    for point_attributes, value in points:
        key = tuple(point_attributes.get(k) for k in keys)
        found[key] = found.get(key, 0) + value
    return found


def histogram_sum(spans: SpanCapture, name: str) -> float:
    """The sum of every value recorded on histogram ``name`` (``SpanCapture.metric_points`` gives only counts)."""
    data = spans.metric(name).data
    assert isinstance(data, Histogram), name
    return sum(point.sum for point in data.data_points)


def run_python(code: str) -> Any:
    """Run ``code`` in a fresh interpreter (no OTEL_* variables) and decode the JSON it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- tracing -------------------------------------------------------------------------


class TestTraceShape:
    """One trace per execution: a pipeline span with a child span per stage."""

    async def test_one_trace_per_execution(self, pipekit_spans: SpanCapture) -> None:
        """Two executions make two traces, each holding its own pipeline and stage spans."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b"))
        first = await execute(pipekit_spans, pipeline)
        second = await execute(pipekit_spans, pipeline)
        names_by_trace: dict[int, set[str]] = {}
        for span in pipekit_spans.spans:
            names_by_trace.setdefault(context_of(span).trace_id, set()).add(span.name)
        assert len(names_by_trace) == 2
        assert list(names_by_trace.values()) == [{"pipeline p", "stage a", "stage b"}] * 2
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage a
                stage b
            pipeline p
                stage a
                stage b
            """,
        )
        run_ids = {attributes(s)[REQUEST_ID] for s in pipekit_spans.spans if s.name == "pipeline p"}
        assert run_ids == {first.id, second.id}

    async def test_stage_spans_are_children_of_the_pipeline_span(self, pipekit_spans: SpanCapture) -> None:
        """The pipeline span is the root; each stage span is its direct child."""
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")))
        assert response.ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage a
                stage b
            """,
        )
        assert pipekit_spans.find("pipeline p").parent is None
        assert len(trace_ids(pipekit_spans)) == 1

    async def test_parallel_stages_are_siblings(self, pipekit_spans: SpanCapture) -> None:
        """Stages running concurrently have overlapping spans, all children of the pipeline span."""
        left_started, right_started = anyio.Event(), anyio.Event()

        async def left(ctx: pk.StageContext) -> None:
            left_started.set()
            await right_started.wait()

        async def right(ctx: pk.StageContext) -> None:
            right_started.set()
            await left_started.wait()

        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("first"))
            .add_parallel_stages(make("left", left), make("right", right))
            .add_stage(MockStage("last"))
        )
        assert (await execute(pipekit_spans, pipeline)).ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage first
                stage left
                stage right
                stage last
            """,
        )
        left_span, right_span = pipekit_spans.find("stage left"), pipekit_spans.find("stage right")
        assert left_span.start_time is not None
        assert right_span.start_time is not None
        assert left_span.end_time is not None
        assert right_span.end_time is not None
        assert left_span.start_time < right_span.end_time
        assert right_span.start_time < left_span.end_time

    async def test_graph_stages_carry_their_dependencies(self, pipekit_spans: SpanCapture) -> None:
        """A stage's span names the stages it depends on; roots carry no dependency attribute."""
        pipeline = (
            pk.Pipeline("g")
            .add_stage(MockStage("a"), depends_on=())
            .add_stage(MockStage("b"), depends_on=())
            .add_stage(MockStage("c"), depends_on=("a", "b"))
            .add_stage(MockStage("d"), depends_on=("c",))
        )
        assert (await execute(pipekit_spans, pipeline)).ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline g
                stage a
                stage b
                stage c
                stage d
            """,
        )
        assert sorted(attributes(pipekit_spans.find("stage c"))[DEPENDS_ON]) == ["a", "b"]
        assert list(attributes(pipekit_spans.find("stage d"))[DEPENDS_ON]) == ["c"]
        assert DEPENDS_ON not in attributes(pipekit_spans.find("stage a"))
        assert DEPENDS_ON not in attributes(pipekit_spans.find("stage b"))

    async def test_user_spans_nest_under_the_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """A span opened inside a stage's execute is a child of that stage's span."""
        tracer = user_tracer(pipekit_spans)

        async def work(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user work"):
                await anyio.lowlevel.checkpoint()

        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(make("b", work))
        assert (await execute(pipekit_spans, pipeline)).ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage a
                stage b
                    user work
            """,
        )
        assert len(trace_ids(pipekit_spans)) == 1


@on_fake_clock
class TestRetrySpans:
    """A retried stage gets a span per attempt and a retry event per retry (back-off on the fake clock)."""

    async def test_attempt_spans_under_the_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """Succeeding on attempt 3 leaves three attempt spans; the failed two are ERROR with the exception."""
        flaky = MockStage("flaky", output="done", fail_times=2)
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(flaky, retry=RETRY))
        assert response.ok
        assert response.stages["flaky"].attempts == 3
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage flaky
                    stage flaky attempt 1 [ERROR]
                    stage flaky attempt 2 [ERROR]
                    stage flaky attempt 3
            """,
        )
        for n in (1, 2):
            span = pipekit_spans.find(f"stage flaky attempt {n}")
            assert span.status.status_code is StatusCode.ERROR
            exceptions = [e for e in span.events if e.name == "exception"]
            assert len(exceptions) == 1
            assert (exceptions[0].attributes or {})["exception.message"] == planned_failure("flaky", n, 2)
            assert attributes(span)[ERROR_TYPE] == qualified(MockStageError)
            assert attributes(span)[ATTEMPT] == n
            assert attributes(span)[STAGE] == "flaky"
            assert attributes(span)[PIPELINE] == "p"
        last = pipekit_spans.find("stage flaky attempt 3")
        assert last.status.status_code is not StatusCode.ERROR
        assert attributes(last)[ATTEMPT] == 3
        stage_span = pipekit_spans.find("stage flaky")
        assert stage_span.status.status_code is not StatusCode.ERROR
        assert attributes(stage_span)[ATTEMPT] == 3
        assert attributes(stage_span)[STATUS] == "succeeded"

    async def test_retry_events_on_the_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """Each retry adds a ``retry`` event with the failed attempt, the delay and the error type."""
        flaky = MockStage("flaky", fail_times=2)
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(flaky, retry=RETRY))).ok
        # The back-off really waited 0.5 s then 1.0 s (on the fake clock) between the attempts.
        assert [call.time for call in flaky.calls] == pytest.approx([0.0, 0.5, 1.5])
        retries = [e for e in pipekit_spans.find("stage flaky").events if e.name == "retry"]
        assert len(retries) == 2
        for n, (event, delay) in enumerate(zip(retries, [0.5, 1.0], strict=True), start=1):
            event_attributes = event.attributes or {}
            assert event_attributes[ATTEMPT] == n
            assert event_attributes[RETRY_DELAY] == delay
            assert event_attributes[ERROR_TYPE] == qualified(MockStageError)

    async def test_first_time_success_has_no_attempt_span(self, pipekit_spans: SpanCapture) -> None:
        """A stage with a retry policy that succeeds at once has no attempt span and no retry event."""
        steady = MockStage("steady")
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(steady, retry=RETRY))).ok
        assert steady.call_count == 1
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage steady
            """,
        )
        assert [e.name for e in pipekit_spans.find("stage steady").events] == []
        assert attributes(pipekit_spans.find("stage steady"))[ATTEMPT] == 1

    async def test_exhausted_retries_mark_every_attempt_and_the_stage(self, pipekit_spans: SpanCapture) -> None:
        """A stage failing all its attempts has ERROR attempt spans and an ERROR stage span."""
        flaky = MockStage("flaky", fail_times=5)
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(flaky, retry=RETRY))
        assert response.status is pk.Status.FAILED
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage flaky [ERROR]
                    stage flaky attempt 1 [ERROR]
                    stage flaky attempt 2 [ERROR]
                    stage flaky attempt 3 [ERROR]
            """,
        )
        stage_span = pipekit_spans.find("stage flaky")
        assert stage_span.status.status_code is StatusCode.ERROR
        assert attributes(stage_span)[ATTEMPT] == 3
        assert attributes(stage_span)[ERROR_TYPE] == qualified(MockStageError)

    async def test_user_spans_in_a_retried_attempt_nest_under_its_attempt_span(
        self, pipekit_spans: SpanCapture
    ) -> None:
        """A span opened during attempt 2 is a child of the ``attempt 2`` span."""
        tracer = user_tracer(pipekit_spans)
        flaky = MockStage("flaky", fail_times=1)

        async def work(ctx: pk.StageContext) -> Any:
            with tracer.start_as_current_span(f"user work {ctx.attempt}"):
                return await flaky.execute(ctx)

        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(make("flaky", work), retry=RETRY))).ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage flaky
                    stage flaky attempt 1 [ERROR]
                    user work 1 [ERROR]
                    stage flaky attempt 2
                        user work 2
            """,
        )
        # As documented: attempt 1's span is written once a retry happens, so
        # spans opened during the first attempt sit beside it, under the stage span.


class TestSpanAttributes:
    """Spans carry ``pipekit.*`` attributes; failures are recorded as errors."""

    async def test_pipeline_span_attributes(self, pipekit_spans: SpanCapture) -> None:
        """The pipeline span names the pipeline, the request, dry run and final status."""
        request = pk.PipelineRequest(id="req-1", type="deploy")
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        span = pipekit_spans.find("pipeline p")
        assert attributes(span) == {
            PIPELINE: "p",
            REQUEST_ID: "req-1",
            REQUEST_TYPE: "deploy",
            DRY_RUN: False,
            STATUS: "succeeded",
        }
        assert span.status.status_code is not StatusCode.ERROR

    async def test_stage_span_attributes(self, pipekit_spans: SpanCapture) -> None:
        """A stage span names its pipeline and stage, the attempts made and its status."""
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")))).ok
        span = pipekit_spans.find("stage a")
        assert attributes(span) == {PIPELINE: "p", STAGE: "a", ATTEMPT: 1, STATUS: "succeeded"}
        assert span.status.status_code is not StatusCode.ERROR
        assert [e.name for e in span.events] == []

    async def test_dry_run_attribute(self, pipekit_spans: SpanCapture) -> None:
        """A dry run's pipeline span says so, and no stage runs (so no stage span)."""
        request = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        a = MockStage("a")
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(a), request)).ok
        assert a.calls == []
        assert_span_tree(pipekit_spans, "pipeline p")
        assert attributes(pipekit_spans.find("pipeline p"))[DRY_RUN] is True

    async def test_failed_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """A failing stage's span is ERROR, records the exception and names its type."""
        a, b = MockStage("a", output="a", rollback=False), MockStage("b", error=BoomError("b broke"))
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b)
        response = await execute(pipekit_spans, pipeline)
        assert response.status is pk.Status.FAILED
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage a
                stage b [ERROR]
            """,
        )
        span = pipekit_spans.find("stage b")
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description is not None
        assert "b broke" in span.status.description
        exceptions = [e for e in span.events if e.name == "exception"]
        assert len(exceptions) == 1
        assert (exceptions[0].attributes or {})["exception.message"] == "b broke"
        assert attributes(span)[ERROR_TYPE] == qualified(BoomError)
        assert attributes(span)[STATUS] == "failed"
        assert pipekit_spans.find("stage a").status.status_code is not StatusCode.ERROR

    async def test_builtin_error_type_is_the_bare_class_name(self, pipekit_spans: SpanCapture) -> None:
        """``error.type`` of a builtin exception is its plain name (``ValueError``)."""
        await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a", error=ValueError("no"))))
        assert attributes(pipekit_spans.find("stage a"))[ERROR_TYPE] == "ValueError"

    async def test_failed_run_pipeline_span(self, pipekit_spans: SpanCapture) -> None:
        """The pipeline span of a failed run is ERROR with the run's error recorded."""
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("b", error=BoomError)))
        assert isinstance(response.error, pk.StageFailedError)
        span = pipekit_spans.find("pipeline p")
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)[STATUS] == "failed"
        assert attributes(span)[ERROR_TYPE] == "pipekit.StageFailedError"
        assert [e.name for e in span.events].count("exception") == 1

    @on_fake_clock
    async def test_timed_out_stage(self, pipekit_spans: SpanCapture, pipekit_clock: FakeClock) -> None:
        """A stage overrunning its timeout has status ``timed_out``, ERROR, and StageTimeoutError recorded."""
        slow = MockStage("slow", delay=60)
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(slow, timeout=0.01))
        assert response.status is pk.Status.TIMED_OUT
        assert pipekit_clock.elapsed() == pytest.approx(0.01)  # cut off at the timeout, not after the delay
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage slow [ERROR]
            """,
        )
        stage_span = pipekit_spans.find("stage slow")
        assert attributes(stage_span)[STATUS] == "timed_out"
        assert stage_span.status.status_code is StatusCode.ERROR
        assert attributes(stage_span)[ERROR_TYPE] == "pipekit.StageTimeoutError"
        assert attributes(pipekit_spans.find("pipeline p"))[STATUS] == "timed_out"
        assert pipekit_spans.find("pipeline p").status.status_code is StatusCode.ERROR

    async def test_cancelled_run(self, pipekit_spans: SpanCapture) -> None:
        """A cancelled run's pipeline span is ERROR ``cancelled``; the interrupted stage says ``cancelled``."""
        wait = MockStage("wait", block=True)
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(wait)
        async with engine_for(pipekit_spans) as engine:
            handle = await engine.submit(pipeline)
            with anyio.fail_after(5):
                await wait.wait_started()
                response = await handle.cancel()
        assert response.status is pk.Status.CANCELLED
        assert not wait.released  # interrupted while held, never let finish
        assert wait.rollbacks == []  # an interrupted stage is not compensated
        assert attributes(pipekit_spans.find("stage wait"))[STATUS] == "cancelled"
        pipeline_span = pipekit_spans.find("pipeline p")
        assert attributes(pipeline_span)[STATUS] == "cancelled"
        assert pipeline_span.status.status_code is StatusCode.ERROR
        assert attributes(pipeline_span)[ERROR_TYPE] == "pipekit.PipelineCancelledError"
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage a
                stage wait
                rollback a
            """,
        )


class TestRollbackSpans:
    """Every compensated stage gets a ``rollback <name>`` span under the pipeline span."""

    async def test_rollback_span_per_compensated_stage(self, pipekit_spans: SpanCapture) -> None:
        """Rolled-back stages each have a rollback span, a child of the pipeline span."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_stage(MockStage("b"), depends_on=("a",))
            .add_stage(MockStage("plain", output="plain", rollback=False))
            .add_stage(MockStage("c", error=BoomError))
        )
        response = await execute(pipekit_spans, pipeline)
        assert response.status is pk.Status.FAILED
        assert_rolled_back(response, ["b", "a"], order=True)
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage a
                stage b
                stage plain
                stage c [ERROR]
                rollback b
                rollback a
            """,
        )
        for stage in ("a", "b"):
            span = pipekit_spans.find(f"rollback {stage}")
            assert span.status.status_code is not StatusCode.ERROR
            assert attributes(span)[STAGE] == stage
            assert attributes(span)[PIPELINE] == "p"
        assert list(attributes(pipekit_spans.find("rollback b"))[DEPENDS_ON]) == ["a"]
        rollback_a, rollback_b = pipekit_spans.find("rollback a"), pipekit_spans.find("rollback b")
        assert rollback_b.end_time is not None
        assert rollback_a.start_time is not None
        assert rollback_b.end_time <= rollback_a.start_time  # undone in reverse order

    async def test_failing_rollback_span_is_error(self, pipekit_spans: SpanCapture) -> None:
        """A rollback that raises has an ERROR span with the exception; the others are fine."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_stage(MockStage("b", rollback_error=UndoError("cannot undo b")))
            .add_stage(MockStage("c", error=BoomError))
        )
        response = await execute(pipekit_spans, pipeline)
        assert response.status is pk.Status.FAILED
        bad = pipekit_spans.find("rollback b")
        assert bad.status.status_code is StatusCode.ERROR
        assert attributes(bad)[ERROR_TYPE] == qualified(UndoError)
        exceptions = [e for e in bad.events if e.name == "exception"]
        assert len(exceptions) == 1
        assert (exceptions[0].attributes or {})["exception.message"] == "cannot undo b"
        assert pipekit_spans.find("rollback a").status.status_code is not StatusCode.ERROR
        assert pipekit_spans.find("pipeline p").status.status_code is StatusCode.ERROR

    @on_fake_clock
    async def test_rollback_timeout_span_is_error(self, pipekit_spans: SpanCapture, pipekit_clock: FakeClock) -> None:
        """A rollback cut off by the rollback timeout has an ERROR span with ``error.type`` TimeoutError."""
        a = MockStage("a", rollback_delay=math.inf)  # its rollback hangs
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(MockStage("b", error=BoomError)).with_rollback(timeout=0.01)
        response = await execute(pipekit_spans, pipeline)
        assert response.stages["a"].rollback_error is not None
        assert len(a.rollbacks) == 1  # the rollback started, and was cut off
        assert pipekit_clock.elapsed() == pytest.approx(0.01)
        span = pipekit_spans.find("rollback a")
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)[ERROR_TYPE] == "TimeoutError"

    async def test_user_spans_in_a_rollback_nest_under_its_span(self, pipekit_spans: SpanCapture) -> None:
        """A span opened inside a rollback is a child of the ``rollback <name>`` span."""
        tracer = user_tracer(pipekit_spans)

        async def undo(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user undo"):
                await anyio.lowlevel.checkpoint()

        pipeline = pk.Pipeline("p").add_stage(make("a", MockStage("a").execute, undo=undo))
        await execute(pipekit_spans, pipeline.add_stage(MockStage("b", error=BoomError)))
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p [ERROR]
                stage a
                stage b [ERROR]
                rollback a
                    user undo
            """,
        )


class TestParenting:
    """The pipeline span joins the caller's trace."""

    async def test_child_of_the_span_current_at_execute(self, pipekit_spans: SpanCapture) -> None:
        """``execute`` called under a handler span puts the run in the handler's trace, under it."""
        with user_tracer(pipekit_spans).start_as_current_span("handler"):
            assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")))).ok
        assert_span_tree(
            pipekit_spans,
            """
            handler
                pipeline p
                    stage a
            """,
        )
        assert len(trace_ids(pipekit_spans)) == 1

    async def test_engine_run_is_child_of_the_span_current_at_submit(self, pipekit_spans: SpanCapture) -> None:
        """With an Engine, the span current at ``submit`` is the parent, not the one current at entry."""
        tracer = user_tracer(pipekit_spans)
        with tracer.start_as_current_span("engine owner"):
            async with engine_for(pipekit_spans) as engine:
                with tracer.start_as_current_span("handler"):
                    handled = await engine.submit(pk.Pipeline("handled").add_stage(MockStage("a")))
                token = otel_context.attach(otel_context.Context())
                try:
                    orphan = await engine.submit(pk.Pipeline("orphan").add_stage(MockStage("b")))
                finally:
                    otel_context.detach(token)
                with anyio.fail_after(5):
                    assert (await handled.wait()).ok
                    assert (await orphan.wait()).ok
        assert_span_tree(
            pipekit_spans,
            """
            engine owner
                handler
                    pipeline handled
                        stage a
            pipeline orphan
                stage b
            """,
        )
        orphan_span = pipekit_spans.find("pipeline orphan")
        assert orphan_span.parent is None
        assert context_of(orphan_span).trace_id != context_of(pipekit_spans.find("engine owner")).trace_id

    async def test_carrier_makes_the_run_a_child_of_the_remote_span(self, pipekit_spans: SpanCapture) -> None:
        """A ``traceparent`` in the request's carrier parents the run's span on the remote span."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        span = pipekit_spans.find("pipeline p")
        assert f"{context_of(span).trace_id:032x}" == REMOTE_TRACE
        assert span.parent is not None
        assert span.parent.is_remote
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage a
            """,
        )
        assert trace_ids(pipekit_spans) == {int(REMOTE_TRACE, 16)}

    async def test_carrier_wins_over_the_current_span(self, pipekit_spans: SpanCapture) -> None:
        """A request with a carrier is parented on the remote span even under a local span."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        with user_tracer(pipekit_spans).start_as_current_span("local"):
            assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        span = pipekit_spans.find("pipeline p")
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN

    async def test_engine_run_with_carrier(self, pipekit_spans: SpanCapture) -> None:
        """A carrier submitted to an Engine parents the run on the remote span too."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        async with engine_for(pipekit_spans) as engine:
            with anyio.fail_after(5):
                assert (await engine.execute(pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        span = pipekit_spans.find("pipeline p")
        assert f"{context_of(span).trace_id:032x}" == REMOTE_TRACE
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN

    async def test_unsampled_carrier_exports_nothing(self, pipekit_spans: SpanCapture) -> None:
        """A ``traceparent`` with the sampled flag off keeps the run untraced (parent-based sampling)."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-00"})
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        assert pipekit_spans.spans == ()


class TestNestedPipelines:
    """A nested pipeline's trace hangs under the outer stage that runs it."""

    async def test_inner_pipeline_span_under_the_outer_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """``pipeline inner`` is a child of the outer ``stage inner``; its stages are its children."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).add_stage(MockStage("y"))
        outer = pk.Pipeline("outer").add_stage(MockStage("a")).add_stage(inner)
        assert (await execute(pipekit_spans, outer)).ok
        assert_span_tree(
            pipekit_spans,
            """
            pipeline outer
                stage a
                stage inner
                    pipeline inner
                        stage x
                        stage y
            """,
        )
        assert len(trace_ids(pipekit_spans)) == 1

    async def test_inner_pipeline_span_under_the_outer_stage_with_a_carrier(self, pipekit_spans: SpanCapture) -> None:
        """With a carrier on the request, only the outer run hangs under the remote span; the inner nests."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"))
        outer = pk.Pipeline("outer").add_stage(inner)
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        assert (await execute(pipekit_spans, outer, request)).ok
        outer_parent = pipekit_spans.find("pipeline outer").parent
        assert outer_parent is not None
        assert f"{outer_parent.span_id:016x}" == REMOTE_SPAN
        assert_span_tree(
            pipekit_spans,
            """
            pipeline outer
                stage inner
                    pipeline inner
                        stage x
            """,
        )

    async def test_nested_rollback_spans(self, pipekit_spans: SpanCapture) -> None:
        """Rolling back a nested pipeline makes ``rollback inner`` with the inner stages' rollbacks under it."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"))
        outer = pk.Pipeline("outer").add_stage(inner).add_stage(MockStage("c", error=BoomError))
        response = await execute(pipekit_spans, outer)
        assert response.status is pk.Status.FAILED
        assert_span_tree(
            pipekit_spans,
            """
            pipeline outer [ERROR]
                stage inner
                    pipeline inner
                        stage x
                stage c [ERROR]
                rollback inner
                    rollback x
            """,
        )


class TestNotRecording:
    """Without a recording span pipekit makes no spans, and runs work as usual."""

    @on_fake_clock
    async def test_always_off_sampler_exports_nothing(self, pipekit_spans: SpanCapture) -> None:
        """With ALWAYS_OFF, retries, failures, rollbacks and nesting run but no span is exported."""
        with capture_spans(sampler=ALWAYS_OFF) as unsampled:
            tracer = unsampled.tracer_provider.get_tracer("tests.user")

            async def traced(ctx: pk.StageContext) -> None:
                with tracer.start_as_current_span("user work"):
                    await anyio.lowlevel.checkpoint()

            flaky = MockStage("flaky", fail_times=1, rollback_error=UndoError("cannot undo flaky"))
            inner = pk.Pipeline("inner").add_stage(MockStage("x"))
            pipeline = (
                pk.Pipeline("p")
                .add_stage(flaky, retry=RETRY)
                .add_stage(make("traced", traced))
                .add_stage(inner)
                .add_stage(MockStage("last", error=BoomError))
            )
            response = await execute(pipekit_spans, pipeline, tracer_provider=unsampled.tracer_provider)
            assert unsampled.spans == ()
        assert response.status is pk.Status.FAILED
        assert response.stages["flaky"].attempts == 2
        assert response.stages["inner"].rolled_back
        assert isinstance(response.stages["flaky"].rollback_error, UndoError)
        assert [call.time for call in flaky.calls] == pytest.approx([0.0, 0.5])
        assert pipekit_spans.spans == ()
        assert totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE, STATUS)[("p", "failed")] == 1
        assert totals(pipekit_spans.metric_points("pipekit.stage.retries"), STAGE) == {("flaky",): 1}
        assert totals(pipekit_spans.metric_points("pipekit.rollback.failures"), STAGE) == {("flaky",): 1}

    async def test_unsampled_run_logs_still_carry_its_trace_id(self, pipekit_spans: SpanCapture) -> None:
        """Sampled out, a run still has a valid trace id; its log events and ctx.log carry the same one."""

        @pk.stage
        async def logs_it(ctx: pk.StageContext) -> None:
            ctx.log.info("user.line")

        with capture_logs() as logs, capture_spans(sampler=ALWAYS_OFF) as unsampled:
            pipeline = pk.Pipeline("p").add_stage(logs_it)
            assert (await execute(pipekit_spans, pipeline, tracer_provider=unsampled.tracer_provider)).ok
        seen = [e["trace_id"] for e in logs if e["event"] in ("pipekit.pipeline.started", "user.line")]
        assert len(seen) == 2
        assert seen[0] == seen[1]
        assert HEX32.fullmatch(seen[0])
        assert unsampled.spans == ()
        assert pipekit_spans.spans == ()


class TestGlobalProviders:
    """pipekit installs no provider on import, and uses the global ones when given none."""

    def test_import_installs_no_provider(self) -> None:
        """Importing pipekit and pipekit.telemetry leaves the proxy providers (and structlog) alone."""
        found = run_python(
            "import json\n"
            "import structlog\n"
            "from opentelemetry import metrics, trace\n"
            "import pipekit, pipekit.telemetry\n"
            "print(json.dumps({\n"
            "    'tracer': type(trace.get_tracer_provider()).__name__,\n"
            "    'meter': type(metrics.get_meter_provider()).__name__,\n"
            "    'structlog_configured': structlog.is_configured(),\n"
            "}))\n"
        )
        assert found == {"tracer": "ProxyTracerProvider", "meter": "_ProxyMeterProvider", "structlog_configured": False}

    def test_global_providers_are_used_by_default(self) -> None:
        """Without ``tracer_provider=``/``meter_provider=``, a run reports to the globally installed SDK."""
        found = run_python(
            "import json\n"
            "import anyio\n"
            "from opentelemetry import metrics, trace\n"
            "from opentelemetry.sdk.metrics import MeterProvider\n"
            "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
            "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
            "import pipekit as pk\n"
            "exporter = InMemorySpanExporter()\n"
            "tracer_provider = TracerProvider()\n"
            "tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
            "trace.set_tracer_provider(tracer_provider)\n"
            "reader = InMemoryMetricReader()\n"
            "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
            "async def ok(ctx):\n"
            "    return 1\n"
            "async def main():\n"
            "    return await pk.Pipeline('p').add_stage(pk.FunctionStage(name='a', fn=ok)).execute()\n"
            "response = anyio.run(main)\n"
            "data = reader.get_metrics_data()\n"
            "names = [m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics]\n"
            "print(json.dumps({\n"
            "    'status': response.status.value,\n"
            "    'spans': sorted(s.name for s in exporter.get_finished_spans()),\n"
            "    'metrics': sorted(names),\n"
            "}))\n"
        )
        assert found["status"] == "succeeded"
        assert found["spans"] == ["pipeline p", "stage a"]
        assert {"pipekit.executions", "pipekit.stage.runs"} <= set(found["metrics"])


# -- metrics -------------------------------------------------------------------------


class TestRunMetrics:
    """Counters and histograms recorded by runs."""

    async def test_executions_by_pipeline_and_status(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.executions`` and the duration histogram count runs by pipeline and final status."""
        good = pk.Pipeline("p").add_stage(MockStage("a"))
        bad = pk.Pipeline("p").add_stage(MockStage("a", error=BoomError))
        other = pk.Pipeline("q").add_stage(MockStage("a"))
        responses = [await execute(pipekit_spans, pipeline) for pipeline in (good, good, bad, other)]
        expected = {("p", "succeeded"): 2, ("p", "failed"): 1, ("q", "succeeded"): 1}
        assert totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE, STATUS) == expected
        assert totals(pipekit_spans.metric_points("pipekit.execution.duration"), PIPELINE, STATUS) == expected
        total = histogram_sum(pipekit_spans, "pipekit.execution.duration")
        assert math.isclose(total, sum(r.duration for r in responses))

    async def test_dry_runs_are_not_executions(self, pipekit_spans: SpanCapture) -> None:
        """A dry run adds nothing to ``pipekit.executions`` (as documented)."""
        request = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")), request)).ok
        assert totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE) == {}

    async def test_stage_runs_by_stage_and_status(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.stage.runs`` counts every stage by status, skipped ones as ``skipped``."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a", output="a", rollback=False))
            .add_conditional_stage(MockStage("never"), lambda ctx: False)
            .add_stage(MockStage("soft", error=BoomError), continue_on_error=True)
            .add_stage(MockStage("after_soft"), depends_on=("soft",))
            .add_stage(MockStage("hard", error=BoomError), depends_on=("a",))
            .add_stage(MockStage("blocked"), depends_on=("hard",))
        )
        response = await execute(pipekit_spans, pipeline)
        assert response.status is pk.Status.FAILED
        runs = totals(pipekit_spans.metric_points("pipekit.stage.runs"), PIPELINE, STAGE, STATUS)
        assert runs == {
            ("p", "a", "succeeded"): 1,
            ("p", "never", "skipped"): 1,
            ("p", "soft", "failed"): 1,
            ("p", "after_soft", "skipped"): 1,
            ("p", "hard", "failed"): 1,
            ("p", "blocked", "skipped"): 1,
        }
        durations = totals(pipekit_spans.metric_points("pipekit.stage.duration"), STAGE, STATUS)
        assert durations == {("a", "succeeded"): 1, ("soft", "failed"): 1, ("hard", "failed"): 1}

    @on_fake_clock
    async def test_stage_duration_sums_the_stage_durations(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.stage.duration`` records each stage's duration, all attempts included."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("flaky", fail_times=1), retry=RETRY)
        response = await execute(pipekit_spans, pipeline)
        durations = totals(pipekit_spans.metric_points("pipekit.stage.duration"), STAGE, STATUS)
        assert durations == {("a", "succeeded"): 1, ("flaky", "succeeded"): 1}
        expected = sum(result.duration for result in response.stages.values())
        assert math.isclose(histogram_sum(pipekit_spans, "pipekit.stage.duration"), expected)
        assert response.stages["flaky"].duration >= 0.5  # the back-off is part of the stage's duration

    @on_fake_clock
    async def test_retries(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.stage.retries`` counts retries scheduled per stage."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("flaky", fail_times=2), retry=RETRY)
            .add_stage(MockStage("steady"), retry=RETRY)
        )
        assert (await execute(pipekit_spans, pipeline)).ok
        assert totals(pipekit_spans.metric_points("pipekit.stage.retries"), PIPELINE, STAGE) == {("p", "flaky"): 2}

    async def test_rollbacks_and_rollback_failures(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.rollbacks`` counts attempted rollbacks; ``pipekit.rollback.failures`` the failed ones."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_stage(MockStage("b", rollback_error=UndoError("cannot undo b")))
            .add_stage(MockStage("c", error=BoomError))
        )
        await execute(pipekit_spans, pipeline)
        assert totals(pipekit_spans.metric_points("pipekit.rollbacks"), PIPELINE, STAGE) == {
            ("p", "a"): 1,
            ("p", "b"): 1,
        }
        assert totals(pipekit_spans.metric_points("pipekit.rollback.failures"), PIPELINE, STAGE) == {("p", "b"): 1}

    async def test_hook_failures(self, pipekit_spans: SpanCapture) -> None:
        """``pipekit.hook.failures`` counts hook calls that raised, by pipeline."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted | pk.PipelineFinished):
                raise RuntimeError("hook broke")

        with capture_logs() as logs:
            response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(MockStage("a")).with_hooks(broken))
        assert response.ok
        assert response.hook_failures == 2
        assert totals(pipekit_spans.metric_points("pipekit.hook.failures"), PIPELINE) == {("p",): 2}
        assert [e["event"] for e in logs].count("pipekit.hook.failed") == 2

    async def test_nested_pipeline_hook_failures(self, pipekit_spans: SpanCapture) -> None:
        """A nested pipeline's own failing hook is counted too, under the nested pipeline's name."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                raise RuntimeError("hook broke")

        inner = pk.Pipeline("inner").add_stage(MockStage("x")).with_hooks(broken)
        outer = pk.Pipeline("outer").add_stage(inner)
        with capture_logs() as logs:
            assert (await execute(pipekit_spans, outer)).ok
        assert [e["event"] for e in logs].count("pipekit.hook.failed") == 1
        # Counted under the pipeline that was executed, like its other execution metrics.
        assert totals(pipekit_spans.metric_points("pipekit.hook.failures"), PIPELINE) == {("outer",): 1}

    @on_fake_clock
    async def test_every_instrument_is_produced(self, pipekit_spans: SpanCapture) -> None:
        """One workload produces every documented instrument, with its documented kind, unit and attributes."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                raise RuntimeError("hook broke")

        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a", rollback_error=UndoError("cannot undo a")))
            .add_stage(MockStage("flaky", fail_times=1, rollback=False), retry=RETRY)
            .add_stage(MockStage("c", error=BoomError))
        )
        with capture_logs():
            async with engine_for(pipekit_spans, hooks=[broken]) as engine:
                with anyio.fail_after(5):
                    response = await engine.execute(pipeline)
        assert response.status is pk.Status.FAILED
        assert pipekit_spans.metric_names() == set(INSTRUMENTS)
        for name, (kind, unit, keys) in INSTRUMENTS.items():
            metric = pipekit_spans.metric(name)
            # metric() is the first metric of that name, metric_points() every one: so it was reported once.
            assert len(metric.data.data_points) == len(pipekit_spans.metric_points(name)), name
            assert metric.unit == unit, name
            data = metric.data
            if kind == "histogram":
                assert isinstance(data, Histogram), name
            else:
                assert isinstance(data, Sum), name
                assert data.is_monotonic is (kind == "counter"), name
            for point in data.data_points:
                assert set(point.attributes or {}) == set(keys), name


class TestEngineMetrics:
    """The engine's running/queued gauges, and ``engine.metrics`` agreeing with the instruments."""

    async def test_running_and_queued(self, pipekit_spans: SpanCapture) -> None:
        """Running and queued go up while work waits and back to 0 when the engine is done."""

        def gauge(name: str) -> dict[tuple[Any, ...], float]:
            return totals(pipekit_spans.metric_points(f"pipekit.engine.executions.{name}"), PIPELINE)

        wait = MockStage("wait", block=True)
        pipeline = pk.Pipeline("p").add_stage(wait)
        async with engine_for(pipekit_spans, max_concurrent=1) as engine:
            handles = [await engine.submit(pipeline) for _ in range(3)]
            with anyio.fail_after(5):
                await wait.wait_started()
            assert gauge("running") == {("p",): 1}
            assert gauge("queued") == {("p",): 2}
            with anyio.fail_after(5):
                cancelled = await handles[2].cancel()
            assert cancelled.status is pk.Status.CANCELLED
            assert gauge("queued") == {("p",): 1}
            assert gauge("running") == {("p",): 1}
            assert wait.call_count == 1  # one at a time
            wait.release()
        assert [h.status for h in handles] == [pk.Status.SUCCEEDED, pk.Status.SUCCEEDED, pk.Status.CANCELLED]
        assert wait.call_count == 2
        assert gauge("running") == {("p",): 0}
        assert gauge("queued") == {("p",): 0}

    async def test_gauges_return_to_zero_when_the_owner_gives_up(self, pipekit_spans: SpanCapture) -> None:
        """Cancelling the engine's owner settles running and queued work and leaves both gauges at 0."""

        def gauge(name: str) -> dict[tuple[Any, ...], float]:
            return totals(pipekit_spans.metric_points(f"pipekit.engine.executions.{name}"), PIPELINE)

        wait = MockStage("wait", block=True)
        pipeline = pk.Pipeline("p").add_stage(wait)
        with anyio.CancelScope() as scope:
            async with engine_for(pipekit_spans, max_concurrent=1) as engine:
                handles = [await engine.submit(pipeline) for _ in range(3)]
                with anyio.fail_after(5):
                    await wait.wait_started()
                assert gauge("queued") == {("p",): 2}
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert [h.status for h in handles] == [pk.Status.CANCELLED] * 3
        assert wait.call_count == 1  # the queued two never started
        assert gauge("running") == {("p",): 0}
        assert gauge("queued") == {("p",): 0}
        assert totals(pipekit_spans.metric_points("pipekit.executions"), STATUS) == {("cancelled",): 3}

    async def test_engine_metrics_agree_with_the_instruments(self, pipekit_spans: SpanCapture) -> None:
        """Totals, successes, failures, the duration count/sum and hook failures match the instruments."""
        held = MockStage("work", output="wait", block=True)

        # One stage body for every run, so runs of one pipeline differ only by their input.
        async def by_mode(ctx: pk.StageContext) -> str:
            mode = ctx.input["mode"]
            if mode == "fail":
                raise BoomError("asked to")
            if mode == "wait":
                return str(await held.execute(ctx))
            return str(mode)

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted) and event.pipeline == "p":
                raise RuntimeError("hook broke")

        p = pk.Pipeline("p").add_stage(make("work", by_mode))
        q = pk.Pipeline("q").add_stage(make("work", by_mode))
        with capture_logs():
            async with engine_for(pipekit_spans, hooks=[broken]) as engine:
                handles = [await engine.submit(p, input={"mode": m}) for m in ("ok", "ok", "fail", "wait")]
                handles.append(await engine.submit(q, input={"mode": "ok"}))
                with anyio.fail_after(5):
                    await held.wait_started()
                    await handles[3].cancel()
                    responses = [await h.wait() for h in handles]
        assert [r.status for r in responses[:4]] == [
            pk.Status.SUCCEEDED,
            pk.Status.SUCCEEDED,
            pk.Status.FAILED,
            pk.Status.CANCELLED,
        ]
        executions = totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE, STATUS)
        durations = totals(pipekit_spans.metric_points("pipekit.execution.duration"), PIPELINE)
        hook_failures = totals(pipekit_spans.metric_points("pipekit.hook.failures"), PIPELINE)
        for name in ("p", "q"):
            metrics = engine.metrics(name)
            by_status = {status: n for (pipeline, status), n in executions.items() if pipeline == name}
            assert metrics.total_executions == sum(by_status.values())
            assert metrics.succeeded == by_status.get("succeeded", 0)
            assert metrics.failed == sum(n for status, n in by_status.items() if status != "succeeded")
            assert metrics.cancelled == by_status.get("cancelled", 0)
            assert metrics.total_executions == durations[(name,)]
            assert metrics.hook_failures == hook_failures.get((name,), 0)
        assert engine.metrics("p").total_executions == 4
        assert engine.metrics("p").hook_failures == 4
        total = histogram_sum(pipekit_spans, "pipekit.execution.duration")
        assert math.isclose(total, sum(r.duration for r in responses))

    async def test_engine_metrics_agree_with_dry_runs_in_the_mix(self, pipekit_spans: SpanCapture) -> None:
        """Dry runs submitted to an engine are counted the same way by ``engine.metrics`` and the instruments."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        dry = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        async with engine_for(pipekit_spans) as engine:
            with anyio.fail_after(5):
                assert (await engine.execute(pipeline, dry)).ok
                assert (await engine.execute(pipeline)).ok
        instrumented = totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE).get(("p",), 0)
        assert engine.metrics("p").total_executions == instrumented
        durations = totals(pipekit_spans.metric_points("pipekit.execution.duration"), PIPELINE)
        assert engine.metrics("p").total_executions == durations[("p",)]


# -- logs ----------------------------------------------------------------------------


def failing_run() -> pk.Pipeline:
    """A (whose rollback fails), flaky (no rollback; fails once, then succeeds on retry), c (fails)."""
    return (
        pk.Pipeline("p")
        .add_stage(MockStage("a", rollback_error=UndoError("cannot undo a")))
        .add_stage(MockStage("flaky", fail_times=1, rollback=False), retry=RETRY)
        .add_stage(MockStage("c", error=BoomError))
    )


class TestLogs:
    """structlog events of a run, bound with the run's identity and trace."""

    @on_fake_clock
    async def test_run_events_carry_the_run_and_its_trace(self, pipekit_spans: SpanCapture) -> None:
        """A run logs its lifecycle under dotted names, each with request id, pipeline and the run's trace."""
        request = pk.PipelineRequest(id="req-7")
        with capture_logs() as logs:
            response = await execute(pipekit_spans, failing_run(), request)
        assert response.status is pk.Status.FAILED
        trace_id, span_id = hex_ids(pipekit_spans.find("pipeline p"))
        expected = {
            "pipekit.pipeline.started",
            "pipekit.stage.started",
            "pipekit.stage.succeeded",
            "pipekit.stage.retry_scheduled",
            "pipekit.stage.failed",
            "pipekit.rollback.started",
            "pipekit.rollback.failed",
            "pipekit.pipeline.finished",
        }
        ours = [e for e in logs if e["event"].startswith("pipekit.")]
        assert expected <= {e["event"] for e in ours}
        # Events about one stage's execution carry that stage's span; the rest the run's.
        stage_events = {"pipekit.stage.started", "pipekit.stage.succeeded", "pipekit.stage.retry_scheduled"}
        stage_events.add("pipekit.stage.failed")
        for entry in ours:
            assert entry["request_id"] == "req-7", entry
            assert entry["pipeline"] == "p", entry
            assert entry["trace_id"] == trace_id, entry
            if entry["event"] in stage_events:
                assert entry["span_id"] == hex_ids(pipekit_spans.find(f"stage {entry['stage']}"))[1], entry
            elif entry["event"] in ("pipekit.rollback.failed", "pipekit.rollback.stage_rolled_back"):
                assert entry["span_id"] == hex_ids(pipekit_spans.find(f"rollback {entry['stage']}"))[1], entry
            else:
                assert entry["span_id"] == span_id, entry
            assert HEX32.fullmatch(entry["trace_id"])
            assert HEX16.fullmatch(entry["span_id"])

    @on_fake_clock
    async def test_stage_events_name_stage_and_attempt(self, pipekit_spans: SpanCapture) -> None:
        """Stage-level events carry the stage and attempt; levels follow the documented table."""
        with capture_logs() as logs:
            await execute(pipekit_spans, failing_run())

        def one(event: str, **fields: Any) -> Mapping[str, Any]:
            found = [e for e in logs if e["event"] == event and fields.items() <= e.items()]
            assert len(found) == 1, (event, fields, logs)
            return found[0]

        assert one("pipekit.stage.started", stage="a", attempt=1)["log_level"] == "debug"
        assert one("pipekit.stage.succeeded", stage="flaky", attempt=2)["log_level"] == "debug"
        retry = one("pipekit.stage.retry_scheduled", stage="flaky", attempt=1)
        assert retry["delay"] == 0.5
        assert retry["log_level"] == "warning"
        assert one("pipekit.stage.failed", stage="c", attempt=1)["log_level"] == "warning"
        assert one("pipekit.rollback.started")["stages"] == ["a"]
        rollback_failed = one("pipekit.rollback.failed", stage="a")
        assert rollback_failed["log_level"] == "error"
        assert isinstance(rollback_failed["exc_info"], UndoError)
        finished = one("pipekit.pipeline.finished")
        assert finished["status"] == "failed"
        assert finished["log_level"] == "warning"

    async def test_cancelled_stage_is_logged(self, pipekit_spans: SpanCapture) -> None:
        """A stage interrupted by cancellation logs ``pipekit.stage.cancelled`` at info (as documented)."""
        wait = MockStage("wait", block=True)
        pipeline = pk.Pipeline("p").add_stage(wait)
        with capture_logs() as logs:
            async with engine_for(pipekit_spans) as engine:
                handle = await engine.submit(pipeline)
                with anyio.fail_after(5):
                    await wait.wait_started()
                    await handle.cancel()
        cancelled = [e for e in logs if e["event"] == "pipekit.stage.cancelled"]
        assert len(cancelled) == 1
        assert cancelled[0]["stage"] == "wait"
        assert cancelled[0]["log_level"] == "info"
        assert cancelled[0]["request_id"] == handle.id

    async def test_ctx_log_carries_the_stage_span(self, pipekit_spans: SpanCapture) -> None:
        """``ctx.log`` inside a stage is bound with stage, attempt and the stage span's trace and span ids."""

        async def chatty(ctx: pk.StageContext) -> None:
            ctx.log.info("test.inside", answer=42)

        request = pk.PipelineRequest(id="req-9")
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(make("b", chatty))
        with capture_logs() as logs:
            assert (await execute(pipekit_spans, pipeline, request)).ok
        (entry,) = [e for e in logs if e["event"] == "test.inside"]
        trace_id, span_id = hex_ids(pipekit_spans.find("stage b"))
        assert entry["stage"] == "b"
        assert entry["attempt"] == 1
        assert entry["request_id"] == "req-9"
        assert entry["pipeline"] == "p"
        assert entry["trace_id"] == trace_id
        assert entry["span_id"] == span_id
        assert entry["answer"] == 42

    @on_fake_clock
    async def test_ctx_log_in_a_retried_attempt(self, pipekit_spans: SpanCapture) -> None:
        """``ctx.log`` during attempt 2 says attempt 2 and carries that attempt's span."""
        flaky = MockStage("s", fail_times=1)

        async def chatty(ctx: pk.StageContext) -> Any:
            ctx.log.info("test.attempt")
            return await flaky.execute(ctx)

        with capture_logs() as logs:
            assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(make("s", chatty), retry=RETRY))).ok
        entries = [e for e in logs if e["event"] == "test.attempt"]
        assert [e["attempt"] for e in entries] == [1, 2]
        assert (entries[0]["trace_id"], entries[0]["span_id"]) == hex_ids(pipekit_spans.find("stage s"))
        assert (entries[1]["trace_id"], entries[1]["span_id"]) == hex_ids(pipekit_spans.find("stage s attempt 2"))


class TestAuditRegressions:
    """Edge paths found in review: nesting, rollback counts, failing conditions, deadlines, log ids."""

    async def test_nested_pipelines_are_not_executions(self, pipekit_spans: SpanCapture) -> None:
        """A nested pipeline's run is not counted in pipekit.executions, which agree with engine.metrics."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"))
        async with engine_for(pipekit_spans) as engine:
            await engine.execute(inner)
            await engine.execute(pk.Pipeline("outer").add_stage(inner))
            metrics = engine.metrics("inner")
        executions = totals(pipekit_spans.metric_points("pipekit.executions"), PIPELINE)
        assert executions == {("inner",): 1, ("outer",): 1}
        assert metrics.total_executions == 1

    @on_fake_clock
    async def test_rollback_failures_never_exceed_rollbacks(self, pipekit_spans: SpanCapture) -> None:
        """A rollback that never started before the rollback timeout counts as scheduled and as failed."""
        first, second = MockStage("first"), MockStage("second", rollback_delay=math.inf)  # second's rollback hangs
        pipeline = (
            pk.Pipeline("p")
            .add_stage(first)
            .add_stage(second)
            .add_stage(MockStage("boom", error=BoomError))
            .with_rollback(timeout=0.02)
        )
        assert (await execute(pipekit_spans, pipeline)).status is pk.Status.FAILED
        assert first.rollbacks == []  # the rollback timeout ran out while "second" was being undone
        assert len(second.rollbacks) == 1
        rollbacks = totals(pipekit_spans.metric_points("pipekit.rollbacks"), STAGE)
        failures = totals(pipekit_spans.metric_points("pipekit.rollback.failures"), STAGE)
        assert rollbacks == {("first",): 1, ("second",): 1}
        assert failures == {("first",): 1, ("second",): 1}

    async def test_failing_condition_has_an_error_span(self, pipekit_spans: SpanCapture) -> None:
        """A stage whose when= raises appears in the trace as a failed stage span."""

        def broken(ctx: pk.StageContext) -> bool:
            raise KeyError("flag")

        cond = MockStage("cond")
        response = await execute(pipekit_spans, pk.Pipeline("p").add_conditional_stage(cond, broken))
        assert response.status is pk.Status.FAILED
        assert cond.calls == []
        span = pipekit_spans.find("stage cond")
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)["error.type"] == "KeyError"

    @on_fake_clock
    async def test_deadline_interrupted_stage_is_an_error(
        self, pipekit_spans: SpanCapture, pipekit_clock: FakeClock
    ) -> None:
        """A stage cut off by the run's deadline is TIMED_OUT and ERROR in the trace."""
        slow = MockStage("slow", delay=60)
        response = await execute(pipekit_spans, pk.Pipeline("p").add_stage(slow).with_timeout(0.02))
        assert response.status is pk.Status.TIMED_OUT
        assert pipekit_clock.elapsed() == pytest.approx(0.02)
        span = pipekit_spans.find("stage slow")
        assert attributes(span)["pipekit.status"] == "timed_out"
        assert span.status.status_code is StatusCode.ERROR

    async def test_ctx_log_keeps_the_stage_span_after_a_user_span(self, pipekit_spans: SpanCapture) -> None:
        """ctx.log first used inside a user span still names the stage span."""
        tracer = pipekit_spans.tracer_provider.get_tracer("user")

        async def work(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user span"):
                ctx.log.info("user.inside")
            ctx.log.info("user.after")

        with capture_logs() as logs:
            assert (await execute(pipekit_spans, pk.Pipeline("p").add_stage(make("w", work)))).ok
        stage_span_id = hex_ids(pipekit_spans.find("stage w"))[1]
        lines = [e for e in logs if e["event"].startswith("user.")]
        assert [e["span_id"] for e in lines] == [stage_span_id, stage_span_id]

    async def test_hook_failure_log_carries_the_current_span(self, pipekit_spans: SpanCapture) -> None:
        """pipekit.hook.failed names the span current when the event was emitted."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.StageStarted):  # emitted inside the stage's span
                raise RuntimeError("hook broke")

        with capture_logs() as logs:
            response = (
                await pk.Pipeline("p")
                .add_stage(MockStage("a"))
                .execute(
                    hooks=[broken],
                    tracer_provider=pipekit_spans.tracer_provider,
                    meter_provider=pipekit_spans.meter_provider,
                )
            )
        assert response.hook_failures == 1
        (entry,) = [e for e in logs if e["event"] == "pipekit.hook.failed"]
        assert (entry["trace_id"], entry["span_id"]) == hex_ids(pipekit_spans.find("stage a"))

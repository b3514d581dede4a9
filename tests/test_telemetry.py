"""OpenTelemetry spans and metrics and structlog logs of runs, on private in-memory SDK providers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import SpanContext, StatusCode, Tracer
from structlog.testing import capture_logs

import pipekit as pk
from pipekit.telemetry import INSTRUMENTS

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


# -- errors and stages -------------------------------------------------------------


class BoomError(Exception):
    """The failure a test stage raises."""


class FlakyError(Exception):
    """The failure a flaky stage raises before it succeeds."""


class UndoError(Exception):
    """The failure a test rollback raises."""


def qualified(cls: type[BaseException]) -> str:
    """The ``error.type`` pipekit should record for ``cls``: its fully qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


async def succeed(ctx: pk.StageContext) -> str:
    """A stage body that yields once and returns its stage's name."""
    await anyio.lowlevel.checkpoint()
    return ctx.stage


async def boom(ctx: pk.StageContext) -> None:
    """A stage body raising BoomError."""
    await anyio.lowlevel.checkpoint()
    raise BoomError(f"{ctx.stage} broke")


async def undo_ok(ctx: pk.StageContext) -> None:
    """A rollback that succeeds."""
    await anyio.lowlevel.checkpoint()


async def undo_fails(ctx: pk.StageContext) -> None:
    """A rollback raising UndoError."""
    await anyio.lowlevel.checkpoint()
    raise UndoError(f"cannot undo {ctx.stage}")


def ok(name: str, *, undo: UndoFunction | None = None) -> pk.FunctionStage:
    """A stage that succeeds (and rolls back with ``undo``, when given)."""
    return pk.FunctionStage(name=name, fn=succeed, rollback_fn=undo)


def failing(name: str) -> pk.FunctionStage:
    """A stage that raises BoomError."""
    return pk.FunctionStage(name=name, fn=boom)


def make(name: str, fn: StageFunction, *, undo: UndoFunction | None = None) -> pk.FunctionStage:
    """A stage running ``fn``."""
    return pk.FunctionStage(name=name, fn=fn, rollback_fn=undo)


class Flaky:
    """A stage body that fails its first ``failures`` calls with FlakyError, then returns the attempt."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, ctx: pk.StageContext) -> int:
        await anyio.lowlevel.checkpoint()
        self.calls += 1
        if self.calls <= self.failures:
            raise FlakyError(f"attempt {ctx.attempt} failed")
        return ctx.attempt


class FakeSleep:
    """A retry sleep that records the delays and never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


def retrying(sleep: FakeSleep, attempts: int = 3) -> pk.RetryPolicy:
    """A jitter-free policy (delays 0.5, 1.0, ...) that sleeps with ``sleep``."""
    return pk.RetryPolicy(max_attempts=attempts, initial_delay=0.5, multiplier=2, jitter=0, sleep=sleep)


class Gate:
    """A stage body's handshake: it signals ``started`` and waits for ``release``."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, ctx: pk.StageContext) -> str:
        self.started.set()
        await self.release.wait()
        return ctx.stage


async def hang(ctx: pk.StageContext) -> None:
    """A stage body (or rollback) that never finishes on its own."""
    await anyio.sleep_forever()


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


class SpanTree:
    """Finished spans keyed by name, with their parent and children (also by name).

    Names must be unique among the spans given. A span whose parent is not
    among them (a root, or a remote parent) has no parent in the tree.
    """

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.spans = tuple(spans)
        self._by_name: dict[str, ReadableSpan] = {}
        for span in self.spans:
            assert span.name not in self._by_name, f"two spans named {span.name!r}"
            self._by_name[span.name] = span
        names_by_id = {context_of(span).span_id: span.name for span in self.spans}
        self._parents: dict[str, str | None] = {}
        self._children: dict[str, set[str]] = {name: set() for name in self._by_name}
        for span in self.spans:
            parent = names_by_id.get(span.parent.span_id) if span.parent is not None else None
            self._parents[span.name] = parent
            if parent is not None:
                self._children[parent].add(span.name)

    def __getitem__(self, name: str) -> ReadableSpan:
        return self._by_name[name]

    @property
    def names(self) -> set[str]:
        """Every span's name."""
        return set(self._by_name)

    def parent(self, name: str) -> str | None:
        """The name of the span's parent, when the parent is in the tree."""
        return self._parents[name]

    def children(self, name: str) -> set[str]:
        """The names of the span's children."""
        return self._children[name]

    def trace_ids(self) -> set[int]:
        """The trace ids the spans belong to."""
        return {context_of(span).trace_id for span in self.spans}


# -- providers -----------------------------------------------------------------------


class Telemetry:
    """Private SDK tracer and meter providers with in-memory exporters; never installed globally."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)

    @property
    def tracer(self) -> Tracer:
        """A tracer on the private provider, for spans opened by "user code"."""
        return self.tracer_provider.get_tracer("tests.user")

    async def execute(self, pipeline: pk.Pipeline, request: pk.PipelineRequest | None = None) -> pk.PipelineResponse:
        """Run ``pipeline`` with the private providers."""
        with anyio.fail_after(5):
            return await pipeline.execute(
                request, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
            )

    def engine(self, **options: Any) -> pk.Engine:
        """An engine recording to the private providers."""
        return pk.Engine(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options)

    def spans(self) -> tuple[ReadableSpan, ...]:
        """Every finished span so far."""
        return tuple(self.exporter.get_finished_spans())

    def tree(self) -> SpanTree:
        """The finished spans as a tree (names must be unique)."""
        return SpanTree(self.spans())

    def metrics(self) -> dict[str, Metric]:
        """Every metric collected now, by instrument name."""
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    assert metric.name not in found, f"instrument {metric.name!r} reported twice"
                    found[metric.name] = metric
        return found

    def totals(self, name: str, *keys: str) -> dict[tuple[Any, ...], float]:
        """Counter/up-down counter values (histogram counts) summed by the values of attributes ``keys``."""
        metric = self.metrics().get(name)
        if metric is None:
            return {}
        totals: dict[tuple[Any, ...], float] = {}
        for point in metric.data.data_points:
            point_attributes = point.attributes or {}
            key = tuple(point_attributes.get(k) for k in keys)
            if isinstance(point, HistogramDataPoint):
                value: float = point.count
            else:
                assert isinstance(point, NumberDataPoint)
                value = point.value
            totals[key] = totals.get(key, 0) + value
        return totals

    def histogram_sum(self, name: str) -> float:
        """The sum of every value recorded on histogram ``name``."""
        metric = self.metrics()[name]
        assert isinstance(metric.data, Histogram)
        return sum(point.sum for point in metric.data.data_points)

    def shutdown(self) -> None:
        """Stop both providers."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def tel() -> Iterator[Telemetry]:
    """Private tracer and meter providers, shut down after the test."""
    telemetry = Telemetry()
    yield telemetry
    telemetry.shutdown()


@pytest.fixture
def unsampled() -> Iterator[Telemetry]:
    """Private providers whose tracer samples nothing (ALWAYS_OFF)."""
    telemetry = Telemetry(sampler=ALWAYS_OFF)
    yield telemetry
    telemetry.shutdown()


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

    async def test_one_trace_per_execution(self, tel: Telemetry) -> None:
        """Two executions make two traces, each holding its own pipeline and stage spans."""
        pipeline = pk.Pipeline("p").add_stage(ok("a")).add_stage(ok("b"))
        first = await tel.execute(pipeline)
        second = await tel.execute(pipeline)
        names_by_trace: dict[int, set[str]] = {}
        for span in tel.spans():
            names_by_trace.setdefault(context_of(span).trace_id, set()).add(span.name)
        assert len(names_by_trace) == 2
        assert list(names_by_trace.values()) == [{"pipeline p", "stage a", "stage b"}] * 2
        run_ids = {attributes(s)[REQUEST_ID] for s in tel.spans() if s.name == "pipeline p"}
        assert run_ids == {first.id, second.id}

    async def test_stage_spans_are_children_of_the_pipeline_span(self, tel: Telemetry) -> None:
        """The pipeline span is the root; each stage span is its direct child."""
        response = await tel.execute(pk.Pipeline("p").add_stage(ok("a")).add_stage(ok("b")))
        assert response.ok
        tree = tel.tree()
        assert tree.names == {"pipeline p", "stage a", "stage b"}
        assert tree["pipeline p"].parent is None
        assert tree.children("pipeline p") == {"stage a", "stage b"}
        assert len(tree.trace_ids()) == 1

    async def test_parallel_stages_are_siblings(self, tel: Telemetry) -> None:
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
            .add_stage(ok("first"))
            .add_parallel_stages(make("left", left), make("right", right))
            .add_stage(ok("last"))
        )
        assert (await tel.execute(pipeline)).ok
        tree = tel.tree()
        assert tree.children("pipeline p") == {"stage first", "stage left", "stage right", "stage last"}
        assert tree.children("stage left") == tree.children("stage right") == set()
        left_span, right_span = tree["stage left"], tree["stage right"]
        assert left_span.start_time is not None
        assert right_span.start_time is not None
        assert left_span.end_time is not None
        assert right_span.end_time is not None
        assert left_span.start_time < right_span.end_time
        assert right_span.start_time < left_span.end_time

    async def test_graph_stages_carry_their_dependencies(self, tel: Telemetry) -> None:
        """A stage's span names the stages it depends on; roots carry no dependency attribute."""
        pipeline = (
            pk.Pipeline("g")
            .add_stage(ok("a"), depends_on=())
            .add_stage(ok("b"), depends_on=())
            .add_stage(ok("c"), depends_on=("a", "b"))
            .add_stage(ok("d"), depends_on=("c",))
        )
        assert (await tel.execute(pipeline)).ok
        tree = tel.tree()
        assert tree.children("pipeline g") == {"stage a", "stage b", "stage c", "stage d"}
        assert sorted(attributes(tree["stage c"])[DEPENDS_ON]) == ["a", "b"]
        assert list(attributes(tree["stage d"])[DEPENDS_ON]) == ["c"]
        assert DEPENDS_ON not in attributes(tree["stage a"])
        assert DEPENDS_ON not in attributes(tree["stage b"])

    async def test_user_spans_nest_under_the_stage_span(self, tel: Telemetry) -> None:
        """A span opened inside a stage's execute is a child of that stage's span."""
        tracer = tel.tracer

        async def work(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user work"):
                await anyio.lowlevel.checkpoint()

        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")).add_stage(make("b", work)))).ok
        tree = tel.tree()
        assert tree.parent("user work") == "stage b"
        assert tree.parent("stage b") == "pipeline p"
        assert len(tree.trace_ids()) == 1


class TestRetrySpans:
    """A retried stage gets a span per attempt and a retry event per retry."""

    async def test_attempt_spans_under_the_stage_span(self, tel: Telemetry) -> None:
        """Succeeding on attempt 3 leaves three attempt spans; the failed two are ERROR with the exception."""
        flaky = Flaky(failures=2)
        pipeline = pk.Pipeline("p").add_stage(make("flaky", flaky), retry=retrying(FakeSleep()))
        response = await tel.execute(pipeline)
        assert response.ok
        assert response.stages["flaky"].attempts == 3
        tree = tel.tree()
        attempts = {f"stage flaky attempt {n}" for n in (1, 2, 3)}
        assert tree.children("stage flaky") == attempts
        assert tree.parent("stage flaky") == "pipeline p"
        for n in (1, 2):
            span = tree[f"stage flaky attempt {n}"]
            assert span.status.status_code is StatusCode.ERROR
            exceptions = [e for e in span.events if e.name == "exception"]
            assert len(exceptions) == 1
            assert (exceptions[0].attributes or {})["exception.message"] == f"attempt {n} failed"
            assert attributes(span)[ERROR_TYPE] == qualified(FlakyError)
            assert attributes(span)[ATTEMPT] == n
            assert attributes(span)[STAGE] == "flaky"
            assert attributes(span)[PIPELINE] == "p"
        last = tree["stage flaky attempt 3"]
        assert last.status.status_code is not StatusCode.ERROR
        assert attributes(last)[ATTEMPT] == 3
        stage_span = tree["stage flaky"]
        assert stage_span.status.status_code is not StatusCode.ERROR
        assert attributes(stage_span)[ATTEMPT] == 3
        assert attributes(stage_span)[STATUS] == "succeeded"

    async def test_retry_events_on_the_stage_span(self, tel: Telemetry) -> None:
        """Each retry adds a ``retry`` event with the failed attempt, the delay and the error type."""
        sleep = FakeSleep()
        pipeline = pk.Pipeline("p").add_stage(make("flaky", Flaky(failures=2)), retry=retrying(sleep))
        assert (await tel.execute(pipeline)).ok
        assert sleep.delays == [0.5, 1.0]
        retries = [e for e in tel.tree()["stage flaky"].events if e.name == "retry"]
        assert len(retries) == 2
        for n, (event, delay) in enumerate(zip(retries, sleep.delays, strict=True), start=1):
            event_attributes = event.attributes or {}
            assert event_attributes[ATTEMPT] == n
            assert event_attributes[RETRY_DELAY] == delay
            assert event_attributes[ERROR_TYPE] == qualified(FlakyError)

    async def test_first_time_success_has_no_attempt_span(self, tel: Telemetry) -> None:
        """A stage with a retry policy that succeeds at once has no attempt span and no retry event."""
        pipeline = pk.Pipeline("p").add_stage(make("steady", Flaky(failures=0)), retry=retrying(FakeSleep()))
        assert (await tel.execute(pipeline)).ok
        tree = tel.tree()
        assert tree.names == {"pipeline p", "stage steady"}
        assert tree.children("stage steady") == set()
        assert [e.name for e in tree["stage steady"].events] == []
        assert attributes(tree["stage steady"])[ATTEMPT] == 1

    async def test_exhausted_retries_mark_every_attempt_and_the_stage(self, tel: Telemetry) -> None:
        """A stage failing all its attempts has ERROR attempt spans and an ERROR stage span."""
        pipeline = pk.Pipeline("p").add_stage(make("flaky", Flaky(failures=5)), retry=retrying(FakeSleep()))
        response = await tel.execute(pipeline)
        assert response.status is pk.Status.FAILED
        tree = tel.tree()
        assert tree.children("stage flaky") == {f"stage flaky attempt {n}" for n in (1, 2, 3)}
        for n in (1, 2, 3):
            assert tree[f"stage flaky attempt {n}"].status.status_code is StatusCode.ERROR
        stage_span = tree["stage flaky"]
        assert stage_span.status.status_code is StatusCode.ERROR
        assert attributes(stage_span)[ATTEMPT] == 3
        assert attributes(stage_span)[ERROR_TYPE] == qualified(FlakyError)

    async def test_user_spans_in_a_retried_attempt_nest_under_its_attempt_span(self, tel: Telemetry) -> None:
        """A span opened during attempt 2 is a child of the ``attempt 2`` span."""
        tracer = tel.tracer
        flaky = Flaky(failures=1)

        async def work(ctx: pk.StageContext) -> int:
            with tracer.start_as_current_span(f"user work {ctx.attempt}"):
                return await flaky(ctx)

        pipeline = pk.Pipeline("p").add_stage(make("flaky", work), retry=retrying(FakeSleep()))
        assert (await tel.execute(pipeline)).ok
        tree = tel.tree()
        assert tree.parent("user work 2") == "stage flaky attempt 2"
        assert tree.parent("stage flaky attempt 2") == "stage flaky"


class TestSpanAttributes:
    """Spans carry ``pipekit.*`` attributes; failures are recorded as errors."""

    async def test_pipeline_span_attributes(self, tel: Telemetry) -> None:
        """The pipeline span names the pipeline, the request, dry run and final status."""
        request = pk.PipelineRequest(id="req-1", type="deploy")
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        span = tel.tree()["pipeline p"]
        assert attributes(span) == {
            PIPELINE: "p",
            REQUEST_ID: "req-1",
            REQUEST_TYPE: "deploy",
            DRY_RUN: False,
            STATUS: "succeeded",
        }
        assert span.status.status_code is not StatusCode.ERROR

    async def test_stage_span_attributes(self, tel: Telemetry) -> None:
        """A stage span names its pipeline and stage, the attempts made and its status."""
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")))).ok
        span = tel.tree()["stage a"]
        assert attributes(span) == {PIPELINE: "p", STAGE: "a", ATTEMPT: 1, STATUS: "succeeded"}
        assert span.status.status_code is not StatusCode.ERROR
        assert [e.name for e in span.events] == []

    async def test_dry_run_attribute(self, tel: Telemetry) -> None:
        """A dry run's pipeline span says so, and no stage runs (so no stage span)."""
        request = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        tree = tel.tree()
        assert tree.names == {"pipeline p"}
        assert attributes(tree["pipeline p"])[DRY_RUN] is True

    async def test_failed_stage_span(self, tel: Telemetry) -> None:
        """A failing stage's span is ERROR, records the exception and names its type."""
        response = await tel.execute(pk.Pipeline("p").add_stage(ok("a")).add_stage(failing("b")))
        assert response.status is pk.Status.FAILED
        span = tel.tree()["stage b"]
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description is not None
        assert "b broke" in span.status.description
        exceptions = [e for e in span.events if e.name == "exception"]
        assert len(exceptions) == 1
        assert (exceptions[0].attributes or {})["exception.message"] == "b broke"
        assert attributes(span)[ERROR_TYPE] == qualified(BoomError)
        assert attributes(span)[STATUS] == "failed"
        assert tel.tree()["stage a"].status.status_code is not StatusCode.ERROR

    async def test_builtin_error_type_is_the_bare_class_name(self, tel: Telemetry) -> None:
        """``error.type`` of a builtin exception is its plain name (``ValueError``)."""

        async def bad_value(ctx: pk.StageContext) -> None:
            raise ValueError("no")

        await tel.execute(pk.Pipeline("p").add_stage(make("a", bad_value)))
        assert attributes(tel.tree()["stage a"])[ERROR_TYPE] == "ValueError"

    async def test_failed_run_pipeline_span(self, tel: Telemetry) -> None:
        """The pipeline span of a failed run is ERROR with the run's error recorded."""
        response = await tel.execute(pk.Pipeline("p").add_stage(failing("b")))
        assert isinstance(response.error, pk.StageFailedError)
        span = tel.tree()["pipeline p"]
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)[STATUS] == "failed"
        assert attributes(span)[ERROR_TYPE] == "pipekit.StageFailedError"
        assert [e.name for e in span.events].count("exception") == 1

    async def test_timed_out_stage(self, tel: Telemetry) -> None:
        """A stage overrunning its timeout has status ``timed_out``, ERROR, and StageTimeoutError recorded."""
        response = await tel.execute(pk.Pipeline("p").add_stage(make("slow", hang), timeout=0.01))
        assert response.status is pk.Status.TIMED_OUT
        tree = tel.tree()
        stage_span = tree["stage slow"]
        assert attributes(stage_span)[STATUS] == "timed_out"
        assert stage_span.status.status_code is StatusCode.ERROR
        assert attributes(stage_span)[ERROR_TYPE] == "pipekit.StageTimeoutError"
        assert attributes(tree["pipeline p"])[STATUS] == "timed_out"
        assert tree["pipeline p"].status.status_code is StatusCode.ERROR

    async def test_cancelled_run(self, tel: Telemetry) -> None:
        """A cancelled run's pipeline span is ERROR ``cancelled``; the interrupted stage says ``cancelled``."""
        gate = Gate()
        pipeline = pk.Pipeline("p").add_stage(ok("a", undo=undo_ok)).add_stage(make("wait", gate))
        async with tel.engine() as engine:
            handle = await engine.submit(pipeline)
            with anyio.fail_after(5):
                await gate.started.wait()
                response = await handle.cancel()
        assert response.status is pk.Status.CANCELLED
        tree = tel.tree()
        assert attributes(tree["stage wait"])[STATUS] == "cancelled"
        assert attributes(tree["pipeline p"])[STATUS] == "cancelled"
        assert tree["pipeline p"].status.status_code is StatusCode.ERROR
        assert attributes(tree["pipeline p"])[ERROR_TYPE] == "pipekit.PipelineCancelledError"
        assert tree.parent("rollback a") == "pipeline p"


class TestRollbackSpans:
    """Every compensated stage gets a ``rollback <name>`` span under the pipeline span."""

    async def test_rollback_span_per_compensated_stage(self, tel: Telemetry) -> None:
        """Rolled-back stages each have a rollback span, a child of the pipeline span."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_ok))
            .add_stage(ok("b", undo=undo_ok), depends_on=("a",))
            .add_stage(ok("plain"))
            .add_stage(failing("c"))
        )
        response = await tel.execute(pipeline)
        assert response.status is pk.Status.FAILED
        tree = tel.tree()
        rollbacks = {name for name in tree.names if name.startswith("rollback ")}
        assert rollbacks == {"rollback a", "rollback b"}
        for stage in ("a", "b"):
            span = tree[f"rollback {stage}"]
            assert tree.parent(span.name) == "pipeline p"
            assert span.status.status_code is not StatusCode.ERROR
            assert attributes(span)[STAGE] == stage
            assert attributes(span)[PIPELINE] == "p"
        assert list(attributes(tree["rollback b"])[DEPENDS_ON]) == ["a"]
        rollback_a, rollback_b = tree["rollback a"], tree["rollback b"]
        assert rollback_b.end_time is not None
        assert rollback_a.start_time is not None
        assert rollback_b.end_time <= rollback_a.start_time  # undone in reverse order

    async def test_failing_rollback_span_is_error(self, tel: Telemetry) -> None:
        """A rollback that raises has an ERROR span with the exception; the others are fine."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_ok))
            .add_stage(ok("b", undo=undo_fails))
            .add_stage(failing("c"))
        )
        response = await tel.execute(pipeline)
        assert response.status is pk.Status.FAILED
        tree = tel.tree()
        bad = tree["rollback b"]
        assert bad.status.status_code is StatusCode.ERROR
        assert attributes(bad)[ERROR_TYPE] == qualified(UndoError)
        exceptions = [e for e in bad.events if e.name == "exception"]
        assert len(exceptions) == 1
        assert (exceptions[0].attributes or {})["exception.message"] == "cannot undo b"
        assert tree["rollback a"].status.status_code is not StatusCode.ERROR
        assert tree["pipeline p"].status.status_code is StatusCode.ERROR

    async def test_rollback_timeout_span_is_error(self, tel: Telemetry) -> None:
        """A rollback cut off by the rollback timeout has an ERROR span with ``error.type`` TimeoutError."""
        pipeline = pk.Pipeline("p").add_stage(ok("a", undo=hang)).add_stage(failing("b")).with_rollback(timeout=0.01)
        response = await tel.execute(pipeline)
        assert response.stages["a"].rollback_error is not None
        span = tel.tree()["rollback a"]
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)[ERROR_TYPE] == "TimeoutError"

    async def test_user_spans_in_a_rollback_nest_under_its_span(self, tel: Telemetry) -> None:
        """A span opened inside a rollback is a child of the ``rollback <name>`` span."""
        tracer = tel.tracer

        async def undo(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user undo"):
                await anyio.lowlevel.checkpoint()

        await tel.execute(pk.Pipeline("p").add_stage(ok("a", undo=undo)).add_stage(failing("b")))
        tree = tel.tree()
        assert tree.parent("user undo") == "rollback a"


class TestParenting:
    """The pipeline span joins the caller's trace."""

    async def test_child_of_the_span_current_at_execute(self, tel: Telemetry) -> None:
        """``execute`` called under a handler span puts the run in the handler's trace, under it."""
        with tel.tracer.start_as_current_span("handler"):
            assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")))).ok
        tree = tel.tree()
        assert tree.parent("pipeline p") == "handler"
        assert tree.parent("stage a") == "pipeline p"
        assert len(tree.trace_ids()) == 1

    async def test_engine_run_is_child_of_the_span_current_at_submit(self, tel: Telemetry) -> None:
        """With an Engine, the span current at ``submit`` is the parent, not the one current at entry."""
        with tel.tracer.start_as_current_span("engine owner"):
            async with tel.engine() as engine:
                with tel.tracer.start_as_current_span("handler"):
                    handled = await engine.submit(pk.Pipeline("handled").add_stage(ok("a")))
                token = otel_context.attach(otel_context.Context())
                try:
                    orphan = await engine.submit(pk.Pipeline("orphan").add_stage(ok("b")))
                finally:
                    otel_context.detach(token)
                with anyio.fail_after(5):
                    assert (await handled.wait()).ok
                    assert (await orphan.wait()).ok
        tree = tel.tree()
        assert tree.parent("pipeline handled") == "handler"
        assert tree.parent("handler") == "engine owner"
        assert tree["pipeline orphan"].parent is None
        assert context_of(tree["pipeline orphan"]).trace_id != context_of(tree["engine owner"]).trace_id
        assert tree.parent("stage b") == "pipeline orphan"

    async def test_carrier_makes_the_run_a_child_of_the_remote_span(self, tel: Telemetry) -> None:
        """A ``traceparent`` in the request's carrier parents the run's span on the remote span."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        tree = tel.tree()
        span = tree["pipeline p"]
        assert f"{context_of(span).trace_id:032x}" == REMOTE_TRACE
        assert span.parent is not None
        assert span.parent.is_remote
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN
        assert tree.parent("stage a") == "pipeline p"
        assert tree.trace_ids() == {int(REMOTE_TRACE, 16)}

    async def test_carrier_wins_over_the_current_span(self, tel: Telemetry) -> None:
        """A request with a carrier is parented on the remote span even under a local span."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        with tel.tracer.start_as_current_span("local"):
            assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        span = tel.tree()["pipeline p"]
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN

    async def test_engine_run_with_carrier(self, tel: Telemetry) -> None:
        """A carrier submitted to an Engine parents the run on the remote span too."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        async with tel.engine() as engine:
            with anyio.fail_after(5):
                assert (await engine.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        span = tel.tree()["pipeline p"]
        assert f"{context_of(span).trace_id:032x}" == REMOTE_TRACE
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == REMOTE_SPAN

    async def test_unsampled_carrier_exports_nothing(self, tel: Telemetry) -> None:
        """A ``traceparent`` with the sampled flag off keeps the run untraced (parent-based sampling)."""
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-00"})
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        assert tel.spans() == ()


class TestNestedPipelines:
    """A nested pipeline's trace hangs under the outer stage that runs it."""

    async def test_inner_pipeline_span_under_the_outer_stage_span(self, tel: Telemetry) -> None:
        """``pipeline inner`` is a child of the outer ``stage inner``; its stages are its children."""
        inner = pk.Pipeline("inner").add_stage(ok("x")).add_stage(ok("y"))
        outer = pk.Pipeline("outer").add_stage(ok("a")).add_stage(inner)
        assert (await tel.execute(outer)).ok
        tree = tel.tree()
        assert tree.children("pipeline outer") == {"stage a", "stage inner"}
        assert tree.children("stage inner") == {"pipeline inner"}
        assert tree.children("pipeline inner") == {"stage x", "stage y"}
        assert len(tree.trace_ids()) == 1

    async def test_inner_pipeline_span_under_the_outer_stage_with_a_carrier(self, tel: Telemetry) -> None:
        """With a carrier on the request, only the outer run hangs under the remote span; the inner nests."""
        inner = pk.Pipeline("inner").add_stage(ok("x"))
        outer = pk.Pipeline("outer").add_stage(inner)
        request = pk.PipelineRequest(carrier={"traceparent": f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"})
        assert (await tel.execute(outer, request)).ok
        tree = tel.tree()
        outer_parent = tree["pipeline outer"].parent
        assert outer_parent is not None
        assert f"{outer_parent.span_id:016x}" == REMOTE_SPAN
        assert tree.parent("pipeline inner") == "stage inner"

    async def test_nested_rollback_spans(self, tel: Telemetry) -> None:
        """Rolling back a nested pipeline makes ``rollback inner`` with the inner stages' rollbacks under it."""
        inner = pk.Pipeline("inner").add_stage(ok("x", undo=undo_ok))
        outer = pk.Pipeline("outer").add_stage(inner).add_stage(failing("c"))
        response = await tel.execute(outer)
        assert response.status is pk.Status.FAILED
        tree = tel.tree()
        assert tree.parent("rollback inner") == "pipeline outer"
        assert tree.parent("rollback x") == "rollback inner"


class TestNotRecording:
    """Without a recording span pipekit makes no spans, and runs work as usual."""

    async def test_always_off_sampler_exports_nothing(self, unsampled: Telemetry) -> None:
        """With ALWAYS_OFF, retries, failures, rollbacks and nesting run but no span is exported."""
        sleep = FakeSleep()
        tracer = unsampled.tracer

        async def traced(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user work"):
                await anyio.lowlevel.checkpoint()

        inner = pk.Pipeline("inner").add_stage(ok("x", undo=undo_ok))
        pipeline = (
            pk.Pipeline("p")
            .add_stage(make("flaky", Flaky(failures=1), undo=undo_fails), retry=retrying(sleep))
            .add_stage(make("traced", traced))
            .add_stage(inner)
            .add_stage(failing("last"))
        )
        response = await unsampled.execute(pipeline)
        assert response.status is pk.Status.FAILED
        assert response.stages["flaky"].attempts == 2
        assert response.stages["inner"].rolled_back
        assert isinstance(response.stages["flaky"].rollback_error, UndoError)
        assert sleep.delays == [0.5]
        assert unsampled.spans() == ()
        assert unsampled.totals("pipekit.executions", PIPELINE, STATUS)[("p", "failed")] == 1
        assert unsampled.totals("pipekit.stage.retries", STAGE) == {("flaky",): 1}
        assert unsampled.totals("pipekit.rollback.failures", STAGE) == {("flaky",): 1}

    async def test_unsampled_run_logs_still_carry_its_trace_id(self, unsampled: Telemetry) -> None:
        """Sampled out, a run still has a valid trace id; its log events and ctx.log carry the same one."""
        seen: list[str] = []

        @pk.stage
        async def logs_it(ctx: pk.StageContext) -> None:
            ctx.log.info("user.line")

        with capture_logs() as logs:
            assert (await unsampled.execute(pk.Pipeline("p").add_stage(logs_it))).ok
        seen = [e["trace_id"] for e in logs if e["event"] in ("pipekit.pipeline.started", "user.line")]
        assert len(seen) == 2
        assert seen[0] == seen[1]
        assert HEX32.fullmatch(seen[0])
        assert unsampled.exporter.get_finished_spans() == ()


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

    async def test_executions_by_pipeline_and_status(self, tel: Telemetry) -> None:
        """``pipekit.executions`` and the duration histogram count runs by pipeline and final status."""
        good = pk.Pipeline("p").add_stage(ok("a"))
        bad = pk.Pipeline("p").add_stage(failing("a"))
        other = pk.Pipeline("q").add_stage(ok("a"))
        responses = [await tel.execute(pipeline) for pipeline in (good, good, bad, other)]
        expected = {("p", "succeeded"): 2, ("p", "failed"): 1, ("q", "succeeded"): 1}
        assert tel.totals("pipekit.executions", PIPELINE, STATUS) == expected
        assert tel.totals("pipekit.execution.duration", PIPELINE, STATUS) == expected
        assert math.isclose(tel.histogram_sum("pipekit.execution.duration"), sum(r.duration for r in responses))

    async def test_dry_runs_are_not_executions(self, tel: Telemetry) -> None:
        """A dry run adds nothing to ``pipekit.executions`` (as documented)."""
        request = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")), request)).ok
        assert tel.totals("pipekit.executions", PIPELINE) == {}

    async def test_stage_runs_by_stage_and_status(self, tel: Telemetry) -> None:
        """``pipekit.stage.runs`` counts every stage by status, skipped ones as ``skipped``."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a"))
            .add_conditional_stage(ok("never"), lambda ctx: False)
            .add_stage(failing("soft"), continue_on_error=True)
            .add_stage(ok("after_soft"), depends_on=("soft",))
            .add_stage(failing("hard"), depends_on=("a",))
            .add_stage(ok("blocked"), depends_on=("hard",))
        )
        response = await tel.execute(pipeline)
        assert response.status is pk.Status.FAILED
        runs = tel.totals("pipekit.stage.runs", PIPELINE, STAGE, STATUS)
        assert runs == {
            ("p", "a", "succeeded"): 1,
            ("p", "never", "skipped"): 1,
            ("p", "soft", "failed"): 1,
            ("p", "after_soft", "skipped"): 1,
            ("p", "hard", "failed"): 1,
            ("p", "blocked", "skipped"): 1,
        }
        durations = tel.totals("pipekit.stage.duration", STAGE, STATUS)
        assert durations == {("a", "succeeded"): 1, ("soft", "failed"): 1, ("hard", "failed"): 1}

    async def test_stage_duration_sums_the_stage_durations(self, tel: Telemetry) -> None:
        """``pipekit.stage.duration`` records each stage's duration, all attempts included."""
        pipeline = (
            pk.Pipeline("p").add_stage(ok("a")).add_stage(make("flaky", Flaky(failures=1)), retry=retrying(FakeSleep()))
        )
        response = await tel.execute(pipeline)
        assert tel.totals("pipekit.stage.duration", STAGE, STATUS) == {("a", "succeeded"): 1, ("flaky", "succeeded"): 1}
        expected = sum(result.duration for result in response.stages.values())
        assert math.isclose(tel.histogram_sum("pipekit.stage.duration"), expected)

    async def test_retries(self, tel: Telemetry) -> None:
        """``pipekit.stage.retries`` counts retries scheduled per stage."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(make("flaky", Flaky(failures=2)), retry=retrying(FakeSleep()))
            .add_stage(make("steady", Flaky(failures=0)), retry=retrying(FakeSleep()))
        )
        assert (await tel.execute(pipeline)).ok
        assert tel.totals("pipekit.stage.retries", PIPELINE, STAGE) == {("p", "flaky"): 2}

    async def test_rollbacks_and_rollback_failures(self, tel: Telemetry) -> None:
        """``pipekit.rollbacks`` counts attempted rollbacks; ``pipekit.rollback.failures`` the failed ones."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_ok))
            .add_stage(ok("b", undo=undo_fails))
            .add_stage(failing("c"))
        )
        await tel.execute(pipeline)
        assert tel.totals("pipekit.rollbacks", PIPELINE, STAGE) == {("p", "a"): 1, ("p", "b"): 1}
        assert tel.totals("pipekit.rollback.failures", PIPELINE, STAGE) == {("p", "b"): 1}

    async def test_hook_failures(self, tel: Telemetry) -> None:
        """``pipekit.hook.failures`` counts hook calls that raised, by pipeline."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted | pk.PipelineFinished):
                raise RuntimeError("hook broke")

        with capture_logs() as logs:
            response = await tel.execute(pk.Pipeline("p").add_stage(ok("a")).with_hooks(broken))
        assert response.ok
        assert response.hook_failures == 2
        assert tel.totals("pipekit.hook.failures", PIPELINE) == {("p",): 2}
        assert [e["event"] for e in logs].count("pipekit.hook.failed") == 2

    async def test_nested_pipeline_hook_failures(self, tel: Telemetry) -> None:
        """A nested pipeline's own failing hook is counted too, under the nested pipeline's name."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                raise RuntimeError("hook broke")

        inner = pk.Pipeline("inner").add_stage(ok("x")).with_hooks(broken)
        outer = pk.Pipeline("outer").add_stage(inner)
        with capture_logs() as logs:
            assert (await tel.execute(outer)).ok
        assert [e["event"] for e in logs].count("pipekit.hook.failed") == 1
        # Counted under the pipeline that was executed, like its other execution metrics.
        assert tel.totals("pipekit.hook.failures", PIPELINE) == {("outer",): 1}

    async def test_every_instrument_is_produced(self, tel: Telemetry) -> None:
        """One workload produces every documented instrument, with its documented kind, unit and attributes."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                raise RuntimeError("hook broke")

        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_fails))
            .add_stage(make("flaky", Flaky(failures=1)), retry=retrying(FakeSleep()))
            .add_stage(failing("c"))
        )
        with capture_logs():
            async with tel.engine(hooks=[broken]) as engine:
                with anyio.fail_after(5):
                    response = await engine.execute(pipeline)
        assert response.status is pk.Status.FAILED
        produced = tel.metrics()
        assert set(produced) == set(INSTRUMENTS)
        for name, (kind, unit, keys) in INSTRUMENTS.items():
            metric = produced[name]
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

    async def test_running_and_queued(self, tel: Telemetry) -> None:
        """Running and queued go up while work waits and back to 0 when the engine is done."""
        gate = Gate()
        pipeline = pk.Pipeline("p").add_stage(make("wait", gate))
        async with tel.engine(max_concurrent=1) as engine:
            handles = [await engine.submit(pipeline) for _ in range(3)]
            with anyio.fail_after(5):
                await gate.started.wait()
            assert tel.totals("pipekit.engine.executions.running", PIPELINE) == {("p",): 1}
            assert tel.totals("pipekit.engine.executions.queued", PIPELINE) == {("p",): 2}
            with anyio.fail_after(5):
                cancelled = await handles[2].cancel()
            assert cancelled.status is pk.Status.CANCELLED
            assert tel.totals("pipekit.engine.executions.queued", PIPELINE) == {("p",): 1}
            assert tel.totals("pipekit.engine.executions.running", PIPELINE) == {("p",): 1}
            gate.release.set()
        assert [h.status for h in handles] == [pk.Status.SUCCEEDED, pk.Status.SUCCEEDED, pk.Status.CANCELLED]
        assert tel.totals("pipekit.engine.executions.running", PIPELINE) == {("p",): 0}
        assert tel.totals("pipekit.engine.executions.queued", PIPELINE) == {("p",): 0}

    async def test_gauges_return_to_zero_when_the_owner_gives_up(self, tel: Telemetry) -> None:
        """Cancelling the engine's owner settles running and queued work and leaves both gauges at 0."""
        gate = Gate()
        pipeline = pk.Pipeline("p").add_stage(make("wait", gate))
        with anyio.CancelScope() as scope:
            async with tel.engine(max_concurrent=1) as engine:
                handles = [await engine.submit(pipeline) for _ in range(3)]
                with anyio.fail_after(5):
                    await gate.started.wait()
                assert tel.totals("pipekit.engine.executions.queued", PIPELINE) == {("p",): 2}
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert [h.status for h in handles] == [pk.Status.CANCELLED] * 3
        assert tel.totals("pipekit.engine.executions.running", PIPELINE) == {("p",): 0}
        assert tel.totals("pipekit.engine.executions.queued", PIPELINE) == {("p",): 0}
        assert tel.totals("pipekit.executions", STATUS) == {("cancelled",): 3}

    async def test_engine_metrics_agree_with_the_instruments(self, tel: Telemetry) -> None:
        """Totals, successes, failures, the duration count/sum and hook failures match the instruments."""
        gate = Gate()

        async def by_mode(ctx: pk.StageContext) -> str:
            mode = ctx.input["mode"]
            if mode == "fail":
                raise BoomError("asked to")
            if mode == "wait":
                return await gate(ctx)
            return str(mode)

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted) and event.pipeline == "p":
                raise RuntimeError("hook broke")

        p = pk.Pipeline("p").add_stage(make("work", by_mode))
        q = pk.Pipeline("q").add_stage(make("work", by_mode))
        with capture_logs():
            async with tel.engine(hooks=[broken]) as engine:
                handles = [await engine.submit(p, input={"mode": m}) for m in ("ok", "ok", "fail", "wait")]
                handles.append(await engine.submit(q, input={"mode": "ok"}))
                with anyio.fail_after(5):
                    await gate.started.wait()
                    await handles[3].cancel()
                    responses = [await h.wait() for h in handles]
        assert [r.status for r in responses[:4]] == [
            pk.Status.SUCCEEDED,
            pk.Status.SUCCEEDED,
            pk.Status.FAILED,
            pk.Status.CANCELLED,
        ]
        executions = tel.totals("pipekit.executions", PIPELINE, STATUS)
        durations = tel.totals("pipekit.execution.duration", PIPELINE)
        hook_failures = tel.totals("pipekit.hook.failures", PIPELINE)
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
        assert math.isclose(tel.histogram_sum("pipekit.execution.duration"), sum(r.duration for r in responses))

    async def test_engine_metrics_agree_with_dry_runs_in_the_mix(self, tel: Telemetry) -> None:
        """Dry runs submitted to an engine are counted the same way by ``engine.metrics`` and the instruments."""
        pipeline = pk.Pipeline("p").add_stage(ok("a"))
        dry = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        async with tel.engine() as engine:
            with anyio.fail_after(5):
                assert (await engine.execute(pipeline, dry)).ok
                assert (await engine.execute(pipeline)).ok
        instrumented = tel.totals("pipekit.executions", PIPELINE).get(("p",), 0)
        assert engine.metrics("p").total_executions == instrumented
        assert engine.metrics("p").total_executions == tel.totals("pipekit.execution.duration", PIPELINE)[("p",)]


# -- logs ----------------------------------------------------------------------------


class TestLogs:
    """structlog events of a run, bound with the run's identity and trace."""

    async def test_run_events_carry_the_run_and_its_trace(self, tel: Telemetry) -> None:
        """A run logs its lifecycle under dotted names, each with request id, pipeline and the run's trace."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_fails))
            .add_stage(make("flaky", Flaky(failures=1)), retry=retrying(FakeSleep()))
            .add_stage(failing("c"))
        )
        request = pk.PipelineRequest(id="req-7")
        with capture_logs() as logs:
            response = await tel.execute(pipeline, request)
        assert response.status is pk.Status.FAILED
        trace_id, span_id = hex_ids(tel.tree()["pipeline p"])
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
                assert entry["span_id"] == hex_ids(tel.tree()[f"stage {entry['stage']}"])[1], entry
            elif entry["event"] in ("pipekit.rollback.failed", "pipekit.rollback.stage_rolled_back"):
                assert entry["span_id"] == hex_ids(tel.tree()[f"rollback {entry['stage']}"])[1], entry
            else:
                assert entry["span_id"] == span_id, entry
            assert HEX32.fullmatch(entry["trace_id"])
            assert HEX16.fullmatch(entry["span_id"])

    async def test_stage_events_name_stage_and_attempt(self, tel: Telemetry) -> None:
        """Stage-level events carry the stage and attempt; levels follow the documented table."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("a", undo=undo_fails))
            .add_stage(make("flaky", Flaky(failures=1)), retry=retrying(FakeSleep()))
            .add_stage(failing("c"))
        )
        with capture_logs() as logs:
            await tel.execute(pipeline)

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

    async def test_cancelled_stage_is_logged(self, tel: Telemetry) -> None:
        """A stage interrupted by cancellation logs ``pipekit.stage.cancelled`` at info (as documented)."""
        gate = Gate()
        pipeline = pk.Pipeline("p").add_stage(make("wait", gate))
        with capture_logs() as logs:
            async with tel.engine() as engine:
                handle = await engine.submit(pipeline)
                with anyio.fail_after(5):
                    await gate.started.wait()
                    await handle.cancel()
        cancelled = [e for e in logs if e["event"] == "pipekit.stage.cancelled"]
        assert len(cancelled) == 1
        assert cancelled[0]["stage"] == "wait"
        assert cancelled[0]["log_level"] == "info"
        assert cancelled[0]["request_id"] == handle.id

    async def test_ctx_log_carries_the_stage_span(self, tel: Telemetry) -> None:
        """``ctx.log`` inside a stage is bound with stage, attempt and the stage span's trace and span ids."""

        async def chatty(ctx: pk.StageContext) -> None:
            ctx.log.info("test.inside", answer=42)

        request = pk.PipelineRequest(id="req-9")
        with capture_logs() as logs:
            assert (await tel.execute(pk.Pipeline("p").add_stage(ok("a")).add_stage(make("b", chatty)), request)).ok
        (entry,) = [e for e in logs if e["event"] == "test.inside"]
        trace_id, span_id = hex_ids(tel.tree()["stage b"])
        assert entry["stage"] == "b"
        assert entry["attempt"] == 1
        assert entry["request_id"] == "req-9"
        assert entry["pipeline"] == "p"
        assert entry["trace_id"] == trace_id
        assert entry["span_id"] == span_id
        assert entry["answer"] == 42

    async def test_ctx_log_in_a_retried_attempt(self, tel: Telemetry) -> None:
        """``ctx.log`` during attempt 2 says attempt 2 and carries that attempt's span."""
        flaky = Flaky(failures=1)

        async def chatty(ctx: pk.StageContext) -> int:
            ctx.log.info("test.attempt")
            return await flaky(ctx)

        with capture_logs() as logs:
            assert (await tel.execute(pk.Pipeline("p").add_stage(make("s", chatty), retry=retrying(FakeSleep())))).ok
        entries = [e for e in logs if e["event"] == "test.attempt"]
        assert [e["attempt"] for e in entries] == [1, 2]
        tree = tel.tree()
        assert (entries[0]["trace_id"], entries[0]["span_id"]) == hex_ids(tree["stage s"])
        assert (entries[1]["trace_id"], entries[1]["span_id"]) == hex_ids(tree["stage s attempt 2"])


class TestAuditRegressions:
    """Edge paths found in review: nesting, rollback counts, failing conditions, deadlines, log ids."""

    async def test_nested_pipelines_are_not_executions(self, tel: Telemetry) -> None:
        """A nested pipeline's run is not counted in pipekit.executions, which agree with engine.metrics."""
        inner = pk.Pipeline("inner").add_stage(ok("x"))
        async with tel.engine() as engine:
            await engine.execute(inner)
            await engine.execute(pk.Pipeline("outer").add_stage(inner))
            metrics = engine.metrics("inner")
        executions = tel.totals("pipekit.executions", PIPELINE)
        assert executions == {("inner",): 1, ("outer",): 1}
        assert metrics.total_executions == 1

    async def test_rollback_failures_never_exceed_rollbacks(self, tel: Telemetry) -> None:
        """A rollback that never started before the rollback timeout counts as scheduled and as failed."""

        async def hang(ctx: pk.StageContext) -> None:
            await anyio.sleep_forever()

        pipeline = (
            pk.Pipeline("p")
            .add_stage(ok("first", undo=undo_ok))
            .add_stage(ok("second", undo=hang))
            .add_stage(failing("boom"))
            .with_rollback(timeout=0.02)
        )
        assert (await tel.execute(pipeline)).status is pk.Status.FAILED
        rollbacks = tel.totals("pipekit.rollbacks", STAGE)
        failures = tel.totals("pipekit.rollback.failures", STAGE)
        assert rollbacks == {("first",): 1, ("second",): 1}
        assert failures == {("first",): 1, ("second",): 1}

    async def test_failing_condition_has_an_error_span(self, tel: Telemetry) -> None:
        """A stage whose when= raises appears in the trace as a failed stage span."""

        def broken(ctx: pk.StageContext) -> bool:
            raise KeyError("flag")

        response = await tel.execute(pk.Pipeline("p").add_conditional_stage(ok("cond"), broken))
        assert response.status is pk.Status.FAILED
        span = tel.tree()["stage cond"]
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)["error.type"] == "KeyError"

    async def test_deadline_interrupted_stage_is_an_error(self, tel: Telemetry) -> None:
        """A stage cut off by the run's deadline is TIMED_OUT and ERROR in the trace."""

        async def forever(ctx: pk.StageContext) -> None:
            await anyio.sleep_forever()

        response = await tel.execute(pk.Pipeline("p").add_stage(make("slow", forever)).with_timeout(0.02))
        assert response.status is pk.Status.TIMED_OUT
        span = tel.tree()["stage slow"]
        assert attributes(span)["pipekit.status"] == "timed_out"
        assert span.status.status_code is StatusCode.ERROR

    async def test_ctx_log_keeps_the_stage_span_after_a_user_span(self, tel: Telemetry) -> None:
        """ctx.log first used inside a user span still names the stage span."""
        tracer = tel.tracer_provider.get_tracer("user")

        async def work(ctx: pk.StageContext) -> None:
            with tracer.start_as_current_span("user span"):
                ctx.log.info("user.inside")
            ctx.log.info("user.after")

        with capture_logs() as logs:
            assert (await tel.execute(pk.Pipeline("p").add_stage(make("w", work)))).ok
        stage_span_id = hex_ids(tel.tree()["stage w"])[1]
        lines = [e for e in logs if e["event"].startswith("user.")]
        assert [e["span_id"] for e in lines] == [stage_span_id, stage_span_id]

    async def test_hook_failure_log_carries_the_current_span(self, tel: Telemetry) -> None:
        """pipekit.hook.failed names the span current when the event was emitted."""

        async def broken(event: pk.Event) -> None:
            if isinstance(event, pk.StageStarted):  # emitted inside the stage's span
                raise RuntimeError("hook broke")

        with capture_logs() as logs:
            response = (
                await pk.Pipeline("p")
                .add_stage(ok("a"))
                .execute(hooks=[broken], tracer_provider=tel.tracer_provider, meter_provider=tel.meter_provider)
            )
        assert response.hook_failures == 1
        (entry,) = [e for e in logs if e["event"] == "pipekit.hook.failed"]
        assert (entry["trace_id"], entry["span_id"]) == hex_ids(tel.tree()["stage a"])

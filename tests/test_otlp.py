"""OTLP export end to end: real exporters from `configure_otlp` to an in-process OTLP receiver.

Every assertion is on what the receiver decoded from the wire (``force_flush``
returns True even when an export failed), over gRPC and over HTTP/protobuf,
with the pipeline run on asyncio and on trio.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import attrs
import pytest
import yaml  # type: ignore[import-untyped]
from opentelemetry import metrics, trace

import pipekit as pk
from pipekit.telemetry import INSTRUMENTS, OtlpTelemetry, configure_otlp
from pipekit.testing import MockStage, fake_clock_backend

from .otlp_receiver import (
    GRPC_METRICS_METHOD,
    GRPC_TRACES_METHOD,
    HTTP_METRICS_PATH,
    HTTP_TRACES_PATH,
    DataPoint,
    Export,
    FlatSpan,
    OtlpReceiver,
    create_receiver,
)

OtlpProtocol = Literal["grpc", "http"]
T = TypeVar("T")

PROTOCOLS: tuple[OtlpProtocol, ...] = ("grpc", "http")
BACKEND_OPTIONS: Mapping[str, Mapping[str, Any]] = {"asyncio": {"debug": True}, "trio": {}}
SERVICE = "pipekit-test"
PIPELINE = "otlp-release"
REQUEST_ID = "req-otlp-1"
REQUEST_TYPE = "release"
FLUSH_MILLIS = 10_000
COLLECTOR_CONFIG = Path(__file__).resolve().parent.parent / "otel-collector.yaml"

#: Where each protocol's exports must arrive: (signal, HTTP path or gRPC method).
ROUTES: Mapping[OtlpProtocol, frozenset[tuple[str, str]]] = {
    "grpc": frozenset({("traces", GRPC_TRACES_METHOD), ("metrics", GRPC_METRICS_METHOD)}),
    "http": frozenset({("traces", HTTP_TRACES_PATH), ("metrics", HTTP_METRICS_PATH)}),
}

#: The instruments a run with retries, a failure and rollbacks must report.
RUN_METRICS = (
    "pipekit.executions",
    "pipekit.execution.duration",
    "pipekit.stage.runs",
    "pipekit.stage.duration",
    "pipekit.stage.retries",
    "pipekit.rollbacks",
)

STAGES = ("prepare", "fetch-a", "fetch-b", "flaky", "explode")
ROLLED_BACK = ("prepare", "fetch-a", "flaky")  # fetch-b has no rollback; explode never completed
FLAKY_FAILURES = 2
FLAKY_ERROR_TYPE = "pipekit.testing.MockStageError"  # what a MockStage's planned failures raise
RETRY_DELAYS = (0.25, 0.5)  # initial_delay=0.25, multiplier=2, no jitter

EXPECTED_SPAN_NAMES = sorted(
    [
        f"pipeline {PIPELINE}",
        *(f"stage {name}" for name in STAGES),
        *(f"stage flaky attempt {n}" for n in range(1, FLAKY_FAILURES + 2)),
        *(f"rollback {name}" for name in ROLLED_BACK),
        "user work",
    ]
)


# -- running pipelines against a receiver --------------------------------------


def run_on(
    backend: str, fn: Callable[[OtlpTelemetry], Awaitable[T]], telemetry: OtlpTelemetry, *, fake_clock: bool = False
) -> T:
    """Run ``fn(telemetry)`` on ``backend`` (asyncio in debug mode), on a fake clock if asked.

    On the fake clock the run's sleeps (retry back-off) take no real time;
    the exporters keep real time (span timestamps are wall-clock times).
    """
    options = dict(BACKEND_OPTIONS[backend])
    name, options = fake_clock_backend((backend, options)) if fake_clock else (backend, options)
    return anyio.run(fn, telemetry, backend=name, backend_options=options)


@attrs.frozen(kw_only=True)
class Outcome:
    """What the pipeline itself reported, and what its mock stages saw."""

    status: pk.Status
    error: BaseException | None
    delays: tuple[float, ...]  # between the flaky stage's attempts, on the fake clock
    undone: frozenset[str]


async def run_release(telemetry: OtlpTelemetry) -> Outcome:
    """Parallel stages, a stage that succeeds on its third attempt, a failing stage, rollback.

    Run it on the fake clock (``run_on(..., fake_clock=True)``): the retry back-off takes no real time.
    """
    prepare = MockStage("prepare", output="prepared")
    fetches = {name: MockStage(name, output=name) for name in ("fetch-a", "fetch-b")}
    flaky = MockStage("flaky", output="fetched", fail_times=FLAKY_FAILURES)
    explode = MockStage("explode", error=RuntimeError("boom"))
    arrived = {name: anyio.Event() for name in fetches}
    app_tracer = telemetry.tracer_provider.get_tracer("app")

    async def prepare_in_a_user_span(ctx: pk.StageContext) -> Any:
        with app_tracer.start_as_current_span("user work"):
            return await prepare.execute(ctx)

    async def fetch(ctx: pk.StageContext) -> Any:
        # Each parallel stage waits for the other: they really run at the same time.
        arrived[ctx.stage].set()
        with anyio.fail_after(5):
            for event in arrived.values():
                await event.wait()
        return await fetches[ctx.stage].execute(ctx)

    policy = pk.RetryPolicy(max_attempts=3, initial_delay=0.25, multiplier=2, jitter=0)
    pipeline = (
        pk.Pipeline(PIPELINE)
        .add_stage(pk.stage(name="prepare", rollback=prepare.rollback)(prepare_in_a_user_span))
        .add_parallel_stages(
            pk.stage(name="fetch-a", rollback=fetches["fetch-a"].rollback)(fetch),
            pk.stage(name="fetch-b")(fetch),  # no rollback
        )
        .add_stage(flaky, retry=policy)
        .add_stage(explode)
    )
    with anyio.fail_after(10):
        response = await pipeline.execute(
            pk.PipelineRequest(id=REQUEST_ID, type=REQUEST_TYPE),
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
        )
    attempts_at = [call.time for call in flaky.calls]
    return Outcome(
        status=response.status,
        error=response.error,
        delays=tuple(later - earlier for earlier, later in itertools.pairwise(attempts_at)),
        undone=frozenset(mock.name for mock in (prepare, *fetches.values(), flaky, explode) if mock.rolled_back),
    )


async def run_ping(telemetry: OtlpTelemetry) -> pk.Status:
    """A one-stage pipeline: enough for one span and a few metric points."""

    async def ping(ctx: pk.StageContext) -> str:
        return "pong"

    with anyio.fail_after(10):
        response = (
            await pk.Pipeline("ping")
            .add_stage(pk.stage(name="ping")(ping))
            .execute(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider)
        )
    return response.status


@attrs.frozen(kw_only=True)
class Exported:
    """A finished export: the pipeline's outcome and what the receiver decoded."""

    outcome: Outcome
    flushed: bool
    spans: list[FlatSpan]
    metrics: dict[str, tuple[DataPoint, ...]]
    resources: list[dict[str, Any]]
    exports: tuple[Export, ...]

    def span(self, name: str) -> FlatSpan:
        """The one span called ``name``."""
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"{len(found)} spans named {name!r}; received {sorted(s.name for s in self.spans)}"
        return found[0]

    def points(self, name: str) -> tuple[DataPoint, ...]:
        """The data points of metric ``name`` (at least one)."""
        assert self.metrics.get(name), f"no data points for {name!r}; received {sorted(self.metrics)}"
        return self.metrics[name]

    def by_stage(self, name: str) -> dict[str, DataPoint]:
        """The points of metric ``name``, by their stage attribute (one each)."""
        points = self.points(name)
        stages = [p.attributes.get("pipekit.stage.name") for p in points]
        assert len(stages) == len(set(stages)), f"{name}: several points per stage: {points}"
        return {str(stage): p for stage, p in zip(stages, points, strict=True)}


def export_with(
    receiver: OtlpReceiver,
    protocol: OtlpProtocol,
    backend: str,
    fn: Callable[[OtlpTelemetry], Awaitable[T]],
    *,
    endpoint: str | None,
    headers: Mapping[str, str] | None = None,
    fake_clock: bool = False,
) -> tuple[T, bool]:
    """Configure OTLP towards ``endpoint``, run ``fn`` on ``backend``, flush and shut down."""
    telemetry = configure_otlp(endpoint, service_name=SERVICE, protocol=protocol, headers=headers, install_global=False)
    try:
        assert telemetry.installed_globally is False
        result = run_on(backend, fn, telemetry, fake_clock=fake_clock)
        flushed = telemetry.force_flush(FLUSH_MILLIS)
    finally:
        telemetry.shutdown()
    return result, flushed


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_ambient_otel_environment() -> Iterator[None]:
    """Run without any OTEL_* variable the machine happens to set."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            mp.delenv(name)
        yield


@pytest.fixture(scope="module")
def exported(protocol: OtlpProtocol, backend: str) -> Exported:
    """Run the release pipeline once per protocol and backend; keep what the receiver got."""
    with create_receiver(protocol) as receiver:
        outcome, flushed = export_with(
            receiver, protocol, backend, run_release, endpoint=receiver.endpoint, fake_clock=True
        )
        return Exported(
            outcome=outcome,
            flushed=flushed,
            spans=receiver.spans(),
            metrics=receiver.metrics(),
            resources=receiver.resource_attributes(),
            exports=receiver.exports,
        )


@pytest.fixture
def receiver(protocol: OtlpProtocol) -> Iterator[OtlpReceiver]:
    """A started receiver for ``protocol``, always stopped afterwards."""
    with create_receiver(protocol) as started:
        yield started


@pytest.fixture(scope="module")
def collector_config() -> dict[str, Any]:
    """``otel-collector.yaml`` at the repository root, parsed."""
    loaded = yaml.safe_load(COLLECTOR_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{COLLECTOR_CONFIG.name} is not a mapping"
    return loaded


# -- the exported run ------------------------------------------------------------

by_protocol_and_backend = [
    pytest.mark.parametrize("backend", list(BACKEND_OPTIONS), scope="module"),
    pytest.mark.parametrize("protocol", PROTOCOLS, scope="module"),
]


def parametrized(cls: type[T]) -> type[T]:
    """Run a class's tests for every protocol and backend, sharing one exported run each."""
    for mark in by_protocol_and_backend:
        cls = mark(cls)
    return cls


@parametrized
class TestExportedRun:
    def test_pipeline_ran_as_planned(self, exported: Exported) -> None:
        """The run failed at explode after two retries of flaky, and rolled back what it could."""
        assert exported.outcome.status is pk.Status.FAILED
        assert exported.outcome.delays == pytest.approx(RETRY_DELAYS)
        assert exported.outcome.undone == frozenset(ROLLED_BACK)

    def test_exports_arrive_on_the_otlp_routes(self, exported: Exported, protocol: OtlpProtocol) -> None:
        """Traces and metrics reach the receiver on the protocol's OTLP routes, and the flush reports success."""
        assert exported.flushed is True
        assert {(e.signal, e.path) for e in exported.exports} == ROUTES[protocol]

    def test_resource_carries_the_service_name(self, exported: Exported) -> None:
        """Every exported resource (spans and metrics) has service.name pipekit-test."""
        assert exported.resources
        assert {r.get("service.name") for r in exported.resources} == {SERVICE}
        assert all(s.resource.get("service.name") == SERVICE for s in exported.spans)


@parametrized
class TestExportedTrace:
    def test_span_names(self, exported: Exported) -> None:
        """The trace holds exactly the pipeline, stage, attempt, rollback and user spans."""
        assert sorted(s.name for s in exported.spans) == EXPECTED_SPAN_NAMES

    def test_one_trace_for_the_run(self, exported: Exported) -> None:
        """Every span of the run shares one valid trace id."""
        trace_ids = {s.trace_id for s in exported.spans}
        assert len(trace_ids) == 1
        (trace_id,) = trace_ids
        assert len(trace_id) == 32
        assert trace_id != "0" * 32
        assert len({s.span_id for s in exported.spans}) == len(exported.spans)

    def test_pipeline_span_is_the_root(self, exported: Exported) -> None:
        """With no span current at execute(), the pipeline span has no parent."""
        assert exported.span(f"pipeline {PIPELINE}").parent_span_id == ""

    def test_stage_spans_are_children_of_the_pipeline_span(self, exported: Exported) -> None:
        """Every stage span's parent is the pipeline span."""
        pipeline = exported.span(f"pipeline {PIPELINE}")
        for name in STAGES:
            assert exported.span(f"stage {name}").parent_span_id == pipeline.span_id, name

    def test_parallel_stage_spans_overlap(self, exported: Exported) -> None:
        """The parallel stages' spans are siblings that overlap in time."""
        a, b = exported.span("stage fetch-a"), exported.span("stage fetch-b")
        assert a.parent_span_id == b.parent_span_id
        assert a.start_ns < b.end_ns
        assert b.start_ns < a.end_ns

    def test_attempt_spans_are_children_of_the_stage_span(self, exported: Exported) -> None:
        """Each attempt of the retried stage has a span under the stage span, numbered from 1."""
        stage = exported.span("stage flaky")
        for n in range(1, FLAKY_FAILURES + 2):
            attempt = exported.span(f"stage flaky attempt {n}")
            assert attempt.parent_span_id == stage.span_id, n
            assert attempt.attributes["pipekit.attempt"] == n
            assert attempt.attributes["pipekit.stage.name"] == "flaky"
            assert attempt.attributes["pipekit.pipeline.name"] == PIPELINE

    def test_attempt_spans_are_sequential_within_the_stage_span(self, exported: Exported) -> None:
        """Attempt spans follow one another, each within the stage span."""
        stage = exported.span("stage flaky")
        attempts = [exported.span(f"stage flaky attempt {n}") for n in range(1, FLAKY_FAILURES + 2)]
        for attempt in attempts:
            assert stage.start_ns <= attempt.start_ns <= attempt.end_ns <= stage.end_ns, attempt.name
        for earlier, later in itertools.pairwise(attempts):
            assert earlier.end_ns <= later.start_ns, later.name

    def test_failed_attempts_are_errors(self, exported: Exported) -> None:
        """Failed attempts have status ERROR and error.type; the successful last one does not."""
        for n in range(1, FLAKY_FAILURES + 1):
            attempt = exported.span(f"stage flaky attempt {n}")
            assert attempt.status_code == "ERROR", n
            assert attempt.attributes["error.type"] == FLAKY_ERROR_TYPE
        last = exported.span(f"stage flaky attempt {FLAKY_FAILURES + 1}")
        assert last.status_code != "ERROR"
        assert "error.type" not in last.attributes

    def test_stages_without_retries_have_no_attempt_spans(self, exported: Exported) -> None:
        """Only the retried stage gets attempt spans."""
        attempts = {s.name.rsplit(" attempt ", 1)[0] for s in exported.spans if " attempt " in s.name}
        assert attempts == {"stage flaky"}

    def test_rollback_spans_are_children_of_the_pipeline_span(self, exported: Exported) -> None:
        """Each compensated stage has a rollback span under the pipeline span."""
        pipeline = exported.span(f"pipeline {PIPELINE}")
        for name in ROLLED_BACK:
            rollback = exported.span(f"rollback {name}")
            assert rollback.parent_span_id == pipeline.span_id, name
            assert rollback.attributes["pipekit.stage.name"] == name
            assert rollback.status_code != "ERROR", name

    def test_rollbacks_follow_the_failure(self, exported: Exported) -> None:
        """Rollback spans start after the failing stage's span ended."""
        failed = exported.span("stage explode")
        for name in ROLLED_BACK:
            assert exported.span(f"rollback {name}").start_ns >= failed.end_ns, name

    def test_user_spans_nest_under_the_stage_span(self, exported: Exported) -> None:
        """A span the stage's code opens is a child of that stage's span."""
        assert exported.span("user work").parent_span_id == exported.span("stage prepare").span_id

    def test_pipeline_span_attributes(self, exported: Exported) -> None:
        """The pipeline span names the pipeline, request id and type, dry run and final status."""
        attributes = exported.span(f"pipeline {PIPELINE}").attributes
        assert attributes["pipekit.pipeline.name"] == PIPELINE
        assert attributes["pipekit.request.id"] == REQUEST_ID
        assert attributes["pipekit.request.type"] == REQUEST_TYPE
        assert attributes["pipekit.dry_run"] is False
        assert attributes["pipekit.status"] == "failed"

    def test_pipeline_span_is_an_error(self, exported: Exported) -> None:
        """The failed run's span has status ERROR, error.type and an exception event."""
        span = exported.span(f"pipeline {PIPELINE}")
        assert span.status_code == "ERROR"
        error = exported.outcome.error
        assert error is not None
        assert str(span.attributes["error.type"]).endswith(type(error).__name__)
        assert [e.name for e in span.events].count("exception") == 1

    def test_stage_span_attributes(self, exported: Exported) -> None:
        """Stage spans carry the pipeline and stage names, final status and attempts made."""
        expected = {"prepare": 1, "fetch-a": 1, "fetch-b": 1, "flaky": FLAKY_FAILURES + 1, "explode": 1}
        for name, attempts in expected.items():
            attributes = exported.span(f"stage {name}").attributes
            assert attributes["pipekit.pipeline.name"] == PIPELINE, name
            assert attributes["pipekit.stage.name"] == name
            assert attributes["pipekit.attempt"] == attempts, name
            assert attributes["pipekit.status"] == ("failed" if name == "explode" else "succeeded"), name

    def test_failing_stage_is_an_error(self, exported: Exported) -> None:
        """The failing stage's span has status ERROR, error.type and the recorded exception."""
        span = exported.span("stage explode")
        assert span.status_code == "ERROR"
        assert "boom" in span.status_message
        assert span.attributes["error.type"] == "RuntimeError"
        (exception,) = [e for e in span.events if e.name == "exception"]
        assert exception.attributes["exception.type"] == "RuntimeError"
        assert exception.attributes["exception.message"] == "boom"

    def test_succeeded_stages_are_not_errors(self, exported: Exported) -> None:
        """Stages that succeeded (flaky included, after its retries) keep a non-error status."""
        for name in STAGES[:-1]:
            span = exported.span(f"stage {name}")
            assert span.status_code != "ERROR", name
            assert "error.type" not in span.attributes, name

    def test_retry_events(self, exported: Exported) -> None:
        """The retried stage's span has one retry event per retry, with attempt, delay and error."""
        retries = [e for e in exported.span("stage flaky").events if e.name == "retry"]
        assert [e.attributes["pipekit.attempt"] for e in retries] == list(range(1, FLAKY_FAILURES + 1))
        assert tuple(e.attributes["pipekit.retry.delay"] for e in retries) == RETRY_DELAYS
        assert all(e.attributes["error.type"] == FLAKY_ERROR_TYPE for e in retries)

    def test_instrumentation_scope(self, exported: Exported) -> None:
        """The run's spans come from the pipekit tracer, versioned like the package."""
        ours = [s for s in exported.spans if s.name != "user work"]
        assert {(s.scope, s.scope_version) for s in ours} == {("pipekit", pk.__version__)}


@parametrized
class TestExportedMetrics:
    def test_metric_names(self, exported: Exported) -> None:
        """Every instrument the run used arrives, with data points."""
        for name in RUN_METRICS:
            assert exported.points(name), name
        assert all(name.startswith("pipekit.") for name in exported.metrics)

    def test_kinds_and_units_match_the_documented_table(self, exported: Exported) -> None:
        """Counters arrive as monotonic sums, histograms as histograms, with the documented units."""
        for name in RUN_METRICS:
            kind, unit, _ = INSTRUMENTS[name]
            for point in exported.points(name):
                assert point.unit == unit, name
                assert point.scope == "pipekit", name
                if kind == "counter":
                    assert (point.kind, point.monotonic) == ("sum", True), name
                else:
                    assert point.kind == "histogram", name

    def test_attributes_match_the_documented_table(self, exported: Exported) -> None:
        """Each point carries exactly the attributes documented for its instrument."""
        for name in RUN_METRICS:
            _, _, attributes = INSTRUMENTS[name]
            for point in exported.points(name):
                assert set(point.attributes) == set(attributes), name
                assert point.attributes["pipekit.pipeline.name"] == PIPELINE, name

    def test_executions(self, exported: Exported) -> None:
        """One failed execution is counted."""
        (point,) = exported.points("pipekit.executions")
        assert point.attributes["pipekit.status"] == "failed"
        assert point.value == 1

    def test_execution_duration(self, exported: Exported) -> None:
        """The execution's duration is recorded once, in seconds."""
        (point,) = exported.points("pipekit.execution.duration")
        assert point.attributes["pipekit.status"] == "failed"
        assert point.count == 1
        assert point.sum is not None
        assert 0 < point.sum < 10

    def test_stage_runs(self, exported: Exported) -> None:
        """Each stage run is counted once with its final status."""
        runs = exported.by_stage("pipekit.stage.runs")
        assert set(runs) == set(STAGES)
        for name, point in runs.items():
            assert point.value == 1, name
            assert point.attributes["pipekit.status"] == ("failed" if name == "explode" else "succeeded"), name

    def test_stage_duration(self, exported: Exported) -> None:
        """Each stage's duration is recorded once."""
        durations = exported.by_stage("pipekit.stage.duration")
        assert set(durations) == set(STAGES)
        for name, point in durations.items():
            assert point.count == 1, name
            assert point.sum is not None
            assert point.sum >= 0, name

    def test_stage_retries(self, exported: Exported) -> None:
        """The retries of the flaky stage are counted, and no others."""
        retries = exported.by_stage("pipekit.stage.retries")
        assert set(retries) == {"flaky"}
        assert retries["flaky"].value == FLAKY_FAILURES

    def test_rollbacks(self, exported: Exported) -> None:
        """Each compensated stage's rollback is counted once."""
        rollbacks = exported.by_stage("pipekit.rollbacks")
        assert set(rollbacks) == set(ROLLED_BACK)
        assert all(p.value == 1 for p in rollbacks.values())


# -- configure_otlp's options ------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKEND_OPTIONS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
class TestConfigureOtlp:
    def test_headers_are_sent(self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str) -> None:
        """headers= goes with every trace and metric export."""
        status, _ = export_with(
            receiver, protocol, backend, run_ping, endpoint=receiver.endpoint, headers={"x-api-key": "k"}
        )
        assert status is pk.Status.SUCCEEDED
        assert {e.signal for e in receiver.exports} == {"traces", "metrics"}
        assert all(e.headers.get("x-api-key") == "k" for e in receiver.exports), receiver.exports

    def test_endpoint_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With endpoint=None, OTEL_EXPORTER_OTLP_ENDPOINT is used (HTTP adds the /v1/... paths)."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        status, _ = export_with(receiver, protocol, backend, run_ping, endpoint=None)
        assert status is pk.Status.SUCCEEDED
        assert {(e.signal, e.path) for e in receiver.exports} == ROUTES[protocol]
        assert [s.name for s in receiver.spans()].count("pipeline ping") == 1
        assert "pipekit.executions" in receiver.metrics()

    def test_signal_endpoints_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With endpoint=None, the per-signal OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT variables are used."""
        for signal, path in (("TRACES", HTTP_TRACES_PATH), ("METRICS", HTTP_METRICS_PATH)):
            # OTLP/HTTP takes each signal's full URL; OTLP/gRPC the server's.
            url = receiver.endpoint + path if protocol == "http" else receiver.endpoint
            monkeypatch.setenv(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", url)
        export_with(receiver, protocol, backend, run_ping, endpoint=None)
        assert {(e.signal, e.path) for e in receiver.exports} == ROUTES[protocol]
        assert [s.name for s in receiver.spans()].count("pipeline ping") == 1

    def test_shutdown_flushes(self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str) -> None:
        """shutdown() alone delivers the buffered spans and metrics."""
        telemetry = configure_otlp(receiver.endpoint, service_name=SERVICE, protocol=protocol, install_global=False)
        try:
            status = run_on(backend, run_ping, telemetry)
        finally:
            telemetry.shutdown()
        assert status is pk.Status.SUCCEEDED
        assert sorted(s.name for s in receiver.spans()) == ["pipeline ping", "stage ping"]
        assert receiver.metrics()["pipekit.executions"][0].value == 1

    def test_metric_export_interval_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_METRIC_EXPORT_INTERVAL (milliseconds) sets how often metrics go out, without any flush."""
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "50")
        telemetry = configure_otlp(receiver.endpoint, service_name=SERVICE, protocol=protocol, install_global=False)
        try:
            run_on(backend, run_ping, telemetry)
            arrived = receiver.wait_until(lambda r: "pipekit.executions" in r.metrics(), timeout=5)
        finally:
            telemetry.shutdown()
        assert arrived, receiver.exports

    def test_metric_export_interval_argument(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str
    ) -> None:
        """metric_export_interval= (seconds) sets how often metrics go out, without any flush."""
        telemetry = configure_otlp(
            receiver.endpoint,
            service_name=SERVICE,
            protocol=protocol,
            install_global=False,
            metric_export_interval=0.05,
        )
        try:
            run_on(backend, run_ping, telemetry)
            arrived = receiver.wait_until(lambda r: "pipekit.executions" in r.metrics(), timeout=5)
        finally:
            telemetry.shutdown()
        assert arrived, receiver.exports

    def test_authorization_header_with_capitals(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str
    ) -> None:
        """An ``Authorization`` header (capitalised, as people write it) is delivered on both protocols."""
        export_with(
            receiver, protocol, backend, run_ping, endpoint=receiver.endpoint, headers={"Authorization": "Bearer t"}
        )
        assert {e.signal for e in receiver.exports} == {"traces", "metrics"}
        for export in receiver.exports:
            assert {k.lower(): v for k, v in export.headers.items()}.get("authorization") == "Bearer t"

    def test_headers_argument_adds_to_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """headers= is added to OTEL_EXPORTER_OTLP_HEADERS (the argument wins on a clash), on both protocols."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-env=1,x-both=env")
        export_with(
            receiver, protocol, backend, run_ping, endpoint=receiver.endpoint, headers={"x-arg": "2", "x-both": "arg"}
        )
        assert {e.signal for e in receiver.exports} == {"traces", "metrics"}
        for export in receiver.exports:
            assert export.headers.get("x-env") == "1"
            assert export.headers.get("x-arg") == "2"
            assert export.headers.get("x-both") == "arg"

    def test_protocol_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With protocol=None, OTEL_EXPORTER_OTLP_PROTOCOL picks the exporter (grpc or http/protobuf)."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc" if protocol == "grpc" else "http/protobuf")
        telemetry = configure_otlp(receiver.endpoint, service_name=SERVICE, install_global=False)
        try:
            run_on(backend, run_ping, telemetry)
            telemetry.force_flush(FLUSH_MILLIS)
        finally:
            telemetry.shutdown()
        assert {e.signal for e in receiver.exports} == {"traces", "metrics"}

    def test_headers_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With headers=None, OTEL_EXPORTER_OTLP_HEADERS is sent with every export."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=from-env")
        export_with(receiver, protocol, backend, run_ping, endpoint=receiver.endpoint)
        assert {e.signal for e in receiver.exports} == {"traces", "metrics"}
        assert all(e.headers.get("x-api-key") == "from-env" for e in receiver.exports), receiver.exports

    def test_resource_attributes_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_RESOURCE_ATTRIBUTES adds to the resource; service_name= still names the service."""
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci,service.name=from-env")
        export_with(receiver, protocol, backend, run_ping, endpoint=receiver.endpoint)
        resources = receiver.resource_attributes()
        assert resources
        for resource in resources:
            assert resource.get("deployment.environment.name") == "ci"
            assert resource.get("service.name") == SERVICE

    def test_gzip_compression_from_the_environment(
        self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_EXPORTER_OTLP_COMPRESSION=gzip compresses exports, and they still decode."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        export_with(receiver, protocol, backend, run_ping, endpoint=receiver.endpoint)
        assert [s.name for s in receiver.spans()].count("stage ping") == 1
        assert "pipekit.stage.runs" in receiver.metrics()
        if protocol == "http":
            assert all(e.headers.get("content-encoding") == "gzip" for e in receiver.exports), receiver.exports


#: Configures OTLP the documented way (global providers), runs a pipeline without passing providers.
GLOBAL_SCRIPT = """
import json
import sys

import anyio

import pipekit as pk
from pipekit.telemetry import configure_otlp

endpoint, protocol, backend = sys.argv[1:4]
telemetry = configure_otlp(endpoint, service_name="pipekit-test", protocol=protocol)


async def ping(ctx):
    return "pong"


async def main():
    response = await pk.Pipeline("global-ping").add_stage(pk.stage(name="ping")(ping)).execute()
    return response.status.value


status = anyio.run(main, backend=backend)
try:
    configure_otlp(endpoint, service_name="again", protocol=protocol)
except RuntimeError:
    second = "RuntimeError"
else:
    second = "installed twice"
telemetry.shutdown()
print(json.dumps({"status": status, "installed_globally": telemetry.installed_globally, "second": second}))
"""


@pytest.mark.parametrize("backend", list(BACKEND_OPTIONS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
class TestConfigureOtlpGlobally:
    def test_installs_the_global_providers(self, receiver: OtlpReceiver, protocol: OtlpProtocol, backend: str) -> None:
        """By default the providers are global: a run given no providers is exported, and a second install fails."""
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(  # a fresh process: OpenTelemetry allows one global provider per process
            [sys.executable, "-c", GLOBAL_SCRIPT, receiver.endpoint, protocol, backend],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=root,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"status": "succeeded", "installed_globally": True, "second": "RuntimeError"}
        assert sorted(s.name for s in receiver.spans()) == ["pipeline global-ping", "stage ping"]
        assert "pipekit.executions" in receiver.metrics()
        assert {r.get("service.name") for r in receiver.resource_attributes()} == {SERVICE}


class TestConfigureOtlpArguments:
    def test_refuses_to_half_install_over_a_noop_provider(self) -> None:
        """With another global tracer provider already set, nothing is installed and RuntimeError says why."""
        script = (
            "from opentelemetry import metrics, trace\n"
            "from pipekit.telemetry import configure_otlp\n"
            "trace.set_tracer_provider(trace.NoOpTracerProvider())\n"
            "try:\n"
            "    configure_otlp('http://127.0.0.1:9', service_name='s')\n"
            "except RuntimeError as exc:\n"
            "    print('refused', 'already installed' in str(exc), type(metrics.get_meter_provider()).__name__)\n"
        )
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["refused", "True", "_ProxyMeterProvider"]

    def test_endpoint_without_a_scheme(self) -> None:
        """A bare host:port is refused with a message showing the form that works."""
        with pytest.raises(ValueError, match=r"needs a scheme: http://host:port"):
            configure_otlp("localhost:4317", service_name=SERVICE, install_global=False)

    def test_unknown_protocol_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unsupported OTEL_EXPORTER_OTLP_PROTOCOL is named in the error."""
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        with pytest.raises(ValueError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL .*'http/json'"):
            configure_otlp("http://127.0.0.1:4317", service_name=SERVICE, install_global=False)

    def test_unknown_protocol(self) -> None:
        """protocol='udp' is a ValueError naming the valid protocols, raised before anything is installed."""
        tracer_provider, meter_provider = trace.get_tracer_provider(), metrics.get_meter_provider()
        with pytest.raises(ValueError, match=r"'udp'") as caught:
            configure_otlp("http://127.0.0.1:4317", service_name=SERVICE, protocol="udp")  # type: ignore[arg-type]
        assert "grpc" in str(caught.value)
        assert "http" in str(caught.value)
        assert trace.get_tracer_provider() is tracer_provider
        assert metrics.get_meter_provider() is meter_provider


# -- the Collector configuration -----------------------------------------------------


def component_type(name: str) -> str:
    """A Collector component's type: its id up to the first ``/`` (``otlp/jaeger`` -> ``otlp``)."""
    return name.split("/", 1)[0]


def port_of(endpoint: object) -> int:
    """The port of a ``host:port`` endpoint."""
    assert isinstance(endpoint, str), endpoint
    return int(endpoint.rsplit(":", 1)[1])


def jaeger_exporters(config: Mapping[str, Any]) -> list[str]:
    """Ids of the otlp exporters sending to jaeger:4317 without TLS."""
    found = []
    for name, declared in (config.get("exporters") or {}).items():
        settings = declared or {}
        tls = settings.get("tls") or {}
        if component_type(name) == "otlp" and settings.get("endpoint") == "jaeger:4317" and tls.get("insecure") is True:
            found.append(name)
    return found


class TestCollectorConfig:
    def test_otlp_receiver_ports(self, collector_config: dict[str, Any]) -> None:
        """The otlp receiver takes gRPC on 4317 and HTTP on 4318."""
        protocols = collector_config["receivers"]["otlp"]["protocols"]
        assert port_of(protocols["grpc"]["endpoint"]) == 4317
        assert port_of(protocols["http"]["endpoint"]) == 4318

    def test_batch_processor(self, collector_config: dict[str, Any]) -> None:
        """A batch processor is defined."""
        assert "batch" in (collector_config.get("processors") or {})

    def test_jaeger_otlp_exporter(self, collector_config: dict[str, Any]) -> None:
        """An otlp exporter sends to jaeger:4317 with tls.insecure: true."""
        assert len(jaeger_exporters(collector_config)) == 1, collector_config.get("exporters")

    def test_debug_exporter(self, collector_config: dict[str, Any]) -> None:
        """A debug exporter is defined."""
        exporters = collector_config.get("exporters") or {}
        assert any(component_type(name) == "debug" for name in exporters), exporters

    def test_no_removed_exporters(self, collector_config: dict[str, Any]) -> None:
        """Neither the removed jaeger exporter nor the removed logging exporter appears."""
        exporters = collector_config.get("exporters") or {}
        assert not {component_type(name) for name in exporters} & {"jaeger", "logging"}, exporters

    def test_traces_pipeline_reaches_jaeger(self, collector_config: dict[str, Any]) -> None:
        """service.pipelines.traces wires the otlp receiver through batch to the Jaeger exporter and debug."""
        traces = collector_config["service"]["pipelines"]["traces"]
        assert "otlp" in traces["receivers"]
        assert "batch" in traces["processors"]
        jaeger = jaeger_exporters(collector_config)
        assert jaeger, collector_config.get("exporters")
        assert jaeger[0] in traces["exporters"]
        assert any(component_type(name) == "debug" for name in traces["exporters"]), traces["exporters"]

    def test_pipelines_use_defined_components(self, collector_config: dict[str, Any]) -> None:
        """Every receiver, processor and exporter a pipeline names is defined (the Collector refuses otherwise)."""
        pipelines = collector_config["service"]["pipelines"]
        assert pipelines
        for pipeline_name, pipeline in pipelines.items():
            for section in ("receivers", "processors", "exporters"):
                defined = collector_config.get(section) or {}
                for component in pipeline.get(section) or []:
                    assert component in defined, f"{pipeline_name}: {section} {component!r} is not defined"

"""OpenTelemetry instrumentation of runs, through the API only.

Instruments are created once per (tracer provider, meter provider) pair and
cached; attribute sets are cached per plan node and status, so a stage costs
no attribute-dict churn. When the run's span is not recording (no SDK
installed, or the trace is sampled out), no stage or rollback spans are made at
all, and only the metric calls remain (no-ops without an SDK).

The instrument names are part of the public contract; `pipekit.telemetry`
documents them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from opentelemetry import metrics, trace
from opentelemetry.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider

from ._version import __version__

if TYPE_CHECKING:
    from ._status import Status as RunStatus

__all__ = [
    "ATTR_ATTEMPT",
    "ATTR_DRY_RUN",
    "ATTR_PIPELINE",
    "ATTR_REQUEST_ID",
    "ATTR_REQUEST_TYPE",
    "ATTR_STAGE",
    "ATTR_STATUS",
    "AttributeCache",
    "Instruments",
    "NodeAttributes",
    "get_instruments",
    "mark_error",
]

SCOPE = "pipekit"

#: Bucket boundaries (seconds) for durations from milliseconds to an hour.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

ATTR_PIPELINE = "pipekit.pipeline.name"
ATTR_REQUEST_ID = "pipekit.request.id"
ATTR_REQUEST_TYPE = "pipekit.request.type"
ATTR_STAGE = "pipekit.stage.name"
ATTR_ATTEMPT = "pipekit.attempt"
ATTR_STATUS = "pipekit.status"
ATTR_DRY_RUN = "pipekit.dry_run"
ATTR_DEPENDS_ON = "pipekit.stage.depends_on"
ATTR_RETRY_DELAY = "pipekit.retry.delay"
ATTR_ERROR_TYPE = "error.type"  # OpenTelemetry semantic convention


class Instruments:
    """The tracer and metric instruments pipekit records with, for one provider pair."""

    __slots__ = (
        "__weakref__",
        "execution_duration",
        "executions",
        "executions_queued",
        "executions_running",
        "hook_failures",
        "retries",
        "rollback_failures",
        "rollbacks",
        "stage_duration",
        "stage_runs",
        "tracer",
    )

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        self.tracer: Tracer = tracer_provider.get_tracer(SCOPE, __version__)
        meter = meter_provider.get_meter(SCOPE, __version__)
        self.executions: Counter = meter.create_counter(
            "pipekit.executions", unit="{execution}", description="Finished executions, by pipeline and status."
        )
        self.execution_duration: Histogram = meter.create_histogram(
            "pipekit.execution.duration",
            unit="s",
            description="Duration of finished executions (rollback included), by pipeline and status.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.stage_runs: Counter = meter.create_counter(
            "pipekit.stage.runs", unit="{stage}", description="Finished stages, by pipeline, stage and status."
        )
        self.stage_duration: Histogram = meter.create_histogram(
            "pipekit.stage.duration",
            unit="s",
            description="Duration of stages that ran (all attempts), by pipeline, stage and status.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries: Counter = meter.create_counter(
            "pipekit.stage.retries", unit="{retry}", description="Retries scheduled, by pipeline and stage."
        )
        self.rollbacks: Counter = meter.create_counter(
            "pipekit.rollbacks", unit="{rollback}", description="Stage rollbacks attempted, by pipeline and stage."
        )
        self.rollback_failures: Counter = meter.create_counter(
            "pipekit.rollback.failures",
            unit="{rollback}",
            description="Stage rollbacks that raised or timed out, by pipeline and stage.",
        )
        self.hook_failures: Counter = meter.create_counter(
            "pipekit.hook.failures", unit="{call}", description="Hook calls that raised or timed out, by pipeline."
        )
        self.executions_running: UpDownCounter = meter.create_up_down_counter(
            "pipekit.engine.executions.running", unit="{execution}", description="Executions running in an Engine."
        )
        self.executions_queued: UpDownCounter = meter.create_up_down_counter(
            "pipekit.engine.executions.queued",
            unit="{execution}",
            description="Executions submitted to an Engine and not started yet.",
        )


#: Providers used when a run is given none, instead of the global ones; a
#: context variable, so it applies to the current task and the tasks it starts.
default_providers: ContextVar[tuple[TracerProvider | None, MeterProvider | None]] = ContextVar(
    "pipekit_default_providers", default=(None, None)
)

#: The same, for every task of the process (a stack: the last entry wins);
#: test fixtures use it because they do not share the test's context.
process_default_providers: list[tuple[TracerProvider | None, MeterProvider | None]] = []

_cache: WeakKeyDictionary[Any, WeakKeyDictionary[Any, Instruments]] = WeakKeyDictionary()


def get_instruments(
    tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None
) -> Instruments:
    """The cached instruments for these providers.

    Providers not given come from `default_providers` (set by
    `pipekit.testing.capture_spans`, for instance), else the global ones.
    """
    if tracer_provider is None or meter_provider is None:
        tp_default, mp_default = default_providers.get()
        if tp_default is None and mp_default is None and process_default_providers:
            tp_default, mp_default = process_default_providers[-1]
        if tracer_provider is None:
            tracer_provider = tp_default
        if meter_provider is None:
            meter_provider = mp_default
    tp = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    mp = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    by_meter = _cache.get(tp)
    if by_meter is None:
        by_meter = _cache[tp] = WeakKeyDictionary()
    found = by_meter.get(mp)
    if found is None:
        found = by_meter[mp] = Instruments(tp, mp)
    return found


def error_type(exc: BaseException) -> str:
    """The ``error.type`` value: the exception's fully qualified class name."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def mark_error(span: Span, exc: BaseException, *, record: bool = True) -> None:
    """Record ``exc`` on ``span`` and set its status to ERROR."""
    if record:
        span.record_exception(exc)
    span.set_attribute(ATTR_ERROR_TYPE, error_type(exc))
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class AttributeCache:
    """Attribute mappings reused across runs: one per (pipeline, stage, status)."""

    __slots__ = ("_by_status", "base")

    def __init__(self, base: Mapping[str, Any]) -> None:
        self.base: Mapping[str, Any] = dict(base)
        self._by_status: dict[str, Mapping[str, Any]] = {}

    def with_status(self, status: RunStatus) -> Mapping[str, Any]:
        found = self._by_status.get(status)
        if found is None:
            found = self._by_status[status] = {**self.base, ATTR_STATUS: status.value}
        return found


class NodeAttributes(AttributeCache):
    """A stage's cached attributes; its span also names its dependencies."""

    __slots__ = ("rollback_span_name", "span_attributes", "span_name")

    def __init__(self, base: Mapping[str, Any], depends_on: Sequence[str] = ()) -> None:
        super().__init__(base)
        self.span_name = f"stage {base[ATTR_STAGE]}"
        self.rollback_span_name = f"rollback {base[ATTR_STAGE]}"
        self.span_attributes: Mapping[str, Any] = (
            {**self.base, ATTR_DEPENDS_ON: list(depends_on)} if depends_on else self.base
        )

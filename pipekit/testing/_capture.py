"""Capturing what runs emit: spans (on a private SDK provider), events and logs."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from structlog.testing import capture_logs

from pipekit._events import Event
from pipekit._instrument import default_providers, process_default_providers
from pipekit._run import extra_listeners, process_listeners

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

__all__ = ["EventCapture", "SpanCapture", "assert_span_tree", "capture_events", "capture_logs", "capture_spans"]

E = TypeVar("E", bound=Event)

_NEEDS_SDK = "pipekit.testing.capture_spans needs the OpenTelemetry SDK: pip install 'pipekit[otlp]'"


class SpanCapture:
    """Spans (and metrics) recorded on a private SDK provider while `capture_spans` was active.

    Attributes:
        tracer_provider: The private tracer provider (runs use it by default
            inside the block; pass it on explicitly elsewhere).
        meter_provider: The private meter provider.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        exporter: InMemorySpanExporter,
        reader: InMemoryMetricReader,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._exporter = exporter
        self._reader = reader

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        """Every finished span, in the order they ended."""
        return tuple(self._exporter.get_finished_spans())

    def names(self) -> list[str]:
        """The names of the finished spans, in start order."""
        return [s.name for s in sorted(self.spans, key=lambda s: s.start_time or 0)]

    def find(self, name: str) -> ReadableSpan:
        """The one finished span called ``name``.

        Raises:
            AssertionError: If there is none or more than one, listing the names.
        """
        found = [s for s in self.spans if s.name == name]
        if len(found) != 1:
            raise AssertionError(f"expected one span {name!r}, found {len(found)} among {self.names()}")
        return found[0]

    def tree(self) -> str:
        """The finished spans as an indented tree, children in start order; errors marked ``[ERROR]``."""
        spans = sorted(self.spans, key=lambda s: s.start_time or 0)
        ids = {s.context.span_id for s in spans if s.context is not None}
        children: dict[int | None, list[ReadableSpan]] = {}
        for span in spans:
            parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
            children.setdefault(parent, []).append(span)
        lines: list[str] = []

        def walk(parent: int | None, depth: int) -> None:
            for span in children.get(parent, []):
                error = " [ERROR]" if span.status.status_code.name == "ERROR" else ""
                lines.append(f"{'    ' * depth}{span.name}{error}")
                if span.context is not None:
                    walk(span.context.span_id, depth + 1)

        walk(None, 0)
        return "\n".join(lines)

    def metric_names(self) -> set[str]:
        """The names of the metrics recorded so far."""
        data = self._reader.get_metrics_data()
        return {
            metric.name
            for resource in (data.resource_metrics if data is not None else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    def metric(self, name: str) -> Metric:
        """The SDK's current data of metric ``name`` (kind, unit, every data point with sums).

        Raises:
            AssertionError: If no such metric was recorded, listing those that were.
        """
        data = self._reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return metric
        raise AssertionError(f"no metric {name!r} recorded; recorded: {sorted(self.metric_names())}")

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """The current data points of metric ``name``: (attributes, value or histogram count)."""
        data = self._reader.get_metrics_data()
        points: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = getattr(point, "count", None)
                        points.append((dict(point.attributes or {}), value))
        return points

    def clear(self) -> None:
        """Forget the spans captured so far."""
        self._exporter.clear()


@contextmanager
def capture_spans(*, everywhere: bool = False, sampler: Sampler | None = None) -> Iterator[SpanCapture]:
    """Record the spans and metrics of runs started inside the block on a private SDK provider.

    Runs (and engines created) inside the block use the private providers
    unless given others; nothing is installed as OpenTelemetry's global
    provider. The providers are shut down on exit::

        with capture_spans() as spans:
            await pipeline.execute()
        print(spans.tree())

    Args:
        everywhere: Apply to runs in every task of the process, not just the
            current task and those it starts (the pytest fixtures use this).
        sampler: The tracer provider's sampler (e.g. ``ALWAYS_OFF`` to test
            sampled-out runs); the SDK default otherwise.

    Raises:
        ImportError: If the OpenTelemetry SDK is not installed.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415 - the SDK is optional
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the dev extra has the SDK
        raise ImportError(_NEEDS_SDK) from exc
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    pair = (tracer_provider, meter_provider)
    token = default_providers.set(pair)
    if everywhere:
        process_default_providers.append(pair)
    try:
        yield SpanCapture(tracer_provider, meter_provider, exporter, reader)
    finally:
        if everywhere:
            process_default_providers.remove(pair)
        default_providers.reset(token)
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _parse_tree(expected: str) -> list[tuple[int, str]]:
    lines = [line.rstrip() for line in textwrap.dedent(expected).splitlines() if line.strip()]
    return [(len(line) - len(line.lstrip()), line.strip()) for line in lines]


def _canonical(rows: Sequence[tuple[int, str]]) -> list[str]:
    """A tree given as indented lines, with siblings sorted, as indented lines (order-insensitive compare)."""

    def build(index: int, depth: int) -> tuple[list[tuple[str, list[Any]]], int]:
        nodes: list[tuple[str, list[Any]]] = []
        while index < len(rows) and rows[index][0] >= depth:
            indent, name = rows[index]
            index += 1
            children, index = build(index, indent + 1) if index < len(rows) and rows[index][0] > indent else ([], index)
            nodes.append((name, children))
        return nodes, index

    forest, _ = build(0, 0)

    def render(nodes: list[tuple[str, list[Any]]], depth: int) -> list[str]:
        # Each sibling sorted together with its whole subtree, so siblings of
        # the same name with different children compare in any order.
        blocks = sorted([f"{'    ' * depth}{name}", *render(children, depth + 1)] for name, children in nodes)
        return [line for block in blocks for line in block]

    return render(forest, 0)


def assert_span_tree(spans: SpanCapture, expected: str) -> None:
    """Assert the captured spans form exactly ``expected``, an indented tree of span names.

    Siblings may appear in any order (parallel stages start in any order);
    append `` [ERROR]`` to a name to require an error status::

        assert_span_tree(spans, '''
            pipeline release [ERROR]
                stage build
                stage deploy [ERROR]
                rollback build
        ''')

    Raises:
        AssertionError: Showing the expected and the actual tree.
    """
    actual = spans.tree()
    if _canonical(_parse_tree(actual)) != _canonical(_parse_tree(expected)):
        raise AssertionError(
            "the spans do not form the expected tree\n"
            f"expected:\n{textwrap.indent(textwrap.dedent(expected).strip(), '    ')}\n"
            f"actual:\n{textwrap.indent(actual, '    ')}"
        )


class EventCapture:
    """The events of runs started while `capture_events` was active, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def kinds(self) -> list[str]:
        """The events' kinds (``"stage_started"``, …), in order."""
        return [e.kind for e in self.events]

    def of(self, kind: type[E]) -> list[E]:
        """The events of one type, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def for_stage(self, stage: str) -> list[Event]:
        """The events about one stage, in order."""
        return [e for e in self.events if e.stage == stage]

    def clear(self) -> None:
        """Forget the events captured so far."""
        self.events.clear()


@contextmanager
def capture_events(*, everywhere: bool = False) -> Iterator[EventCapture]:
    """Collect the events of every run started inside the block (engines created inside too).

    Args:
        everywhere: Collect from runs in every task of the process, not just
            the current task and those it starts (the pytest fixtures use this).
    """
    capture = EventCapture()
    listener = capture.events.append
    if everywhere:  # the process-wide list covers this task too: register once
        process_listeners.append(listener)
        try:
            yield capture
        finally:
            process_listeners.remove(listener)
        return
    token = extra_listeners.set((*extra_listeners.get(), listener))
    try:
        yield capture
    finally:
        extra_listeners.reset(token)

"""A real OTLP receiver, in-process, for the export tests: gRPC and HTTP/protobuf on 127.0.0.1.

Built from the official protobuf definitions in ``opentelemetry-proto``, so the
real OTLP exporters talk to it exactly as they would to a Collector. Each
receiver keeps the decoded export requests (and the headers they came with)
in thread-safe lists; `flatten_spans`, `flatten_metrics` and
`resource_attributes` turn them into plain values to assert on.

Use `create_receiver` as a context manager: it listens on a free port, exposes
``endpoint`` (the base URL to give an exporter) and always stops within a few
seconds on exit.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, Self, cast

import attrs
import grpc  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import (
    MetricsServiceServicer,
    add_MetricsServiceServicer_to_server,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

__all__ = [
    "DataPoint",
    "Export",
    "FlatSpan",
    "GrpcReceiver",
    "HttpReceiver",
    "OtlpReceiver",
    "SpanEvent",
    "create_receiver",
    "flatten_metrics",
    "flatten_spans",
    "resource_attributes",
]

Signal = Literal["traces", "metrics"]

HOST = "127.0.0.1"
#: Seconds a receiver may take to stop (in-flight exports are given one second of grace).
STOP_TIMEOUT = 5.0

GRPC_TRACES_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
GRPC_METRICS_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
HTTP_TRACES_PATH = "/v1/traces"
HTTP_METRICS_PATH = "/v1/metrics"
PROTOBUF = "application/x-protobuf"

_STATUS_CODES = {
    ProtoStatus.STATUS_CODE_UNSET: "UNSET",
    ProtoStatus.STATUS_CODE_OK: "OK",
    ProtoStatus.STATUS_CODE_ERROR: "ERROR",
}


# -- what the receivers keep --------------------------------------------------


@attrs.frozen(kw_only=True)
class Export:
    """One export call as it arrived: its signal, route and headers.

    Attributes:
        signal: ``"traces"`` or ``"metrics"``.
        path: The HTTP path, or the full gRPC method name.
        headers: Request headers (gRPC metadata), names lower-cased.
    """

    signal: Signal
    path: str
    headers: Mapping[str, str]


@attrs.define(eq=False)
class OtlpReceiver:
    """What both receivers share: the decoded requests, kept under a lock.

    Subclasses listen on a free port of 127.0.0.1 between `start` and `stop`.
    """

    # Re-entrant, so that `wait_until`'s predicate can read the received data.
    _arrived: threading.Condition = attrs.field(factory=lambda: threading.Condition(threading.RLock()), init=False)
    _traces: list[ExportTraceServiceRequest] = attrs.field(factory=list, init=False)
    _metrics: list[ExportMetricsServiceRequest] = attrs.field(factory=list, init=False)
    _exports: list[Export] = attrs.field(factory=list, init=False)

    @property
    def endpoint(self) -> str:
        """The base URL to give an OTLP exporter, e.g. ``http://127.0.0.1:40123``."""
        raise NotImplementedError

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop listening, waiting at most `STOP_TIMEOUT` seconds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def record(
        self, path: str, headers: Mapping[str, str], request: ExportTraceServiceRequest | ExportMetricsServiceRequest
    ) -> None:
        """Keep one decoded export request (called from the server threads)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        with self._arrived:
            if isinstance(request, ExportTraceServiceRequest):
                self._traces.append(request)
                self._exports.append(Export(signal="traces", path=path, headers=lowered))
            else:
                self._metrics.append(request)
                self._exports.append(Export(signal="metrics", path=path, headers=lowered))
            self._arrived.notify_all()

    def wait_until(self, predicate: Callable[[Self], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds, re-checking as exports arrive; False after ``timeout`` seconds."""
        with self._arrived:
            return self._arrived.wait_for(lambda: predicate(self), timeout)

    @property
    def trace_requests(self) -> tuple[ExportTraceServiceRequest, ...]:
        """The decoded trace export requests, in arrival order."""
        with self._arrived:
            return tuple(self._traces)

    @property
    def metric_requests(self) -> tuple[ExportMetricsServiceRequest, ...]:
        """The decoded metric export requests, in arrival order."""
        with self._arrived:
            return tuple(self._metrics)

    @property
    def exports(self) -> tuple[Export, ...]:
        """Every export call received, in arrival order."""
        with self._arrived:
            return tuple(self._exports)

    def spans(self) -> list[FlatSpan]:
        """Every span received so far, flattened."""
        return flatten_spans(self.trace_requests)

    def metrics(self) -> dict[str, tuple[DataPoint, ...]]:
        """The latest data point of every metric stream received so far."""
        return flatten_metrics(self.metric_requests)

    def resource_attributes(self) -> list[dict[str, Any]]:
        """The attributes of every resource in every request received so far (spans, then metrics)."""
        return resource_attributes(self.trace_requests, self.metric_requests)


# -- gRPC --------------------------------------------------------------------


class _TraceService(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        self._receiver.record(GRPC_TRACES_METHOD, dict(context.invocation_metadata()), request)
        return ExportTraceServiceResponse()


class _MetricsService(MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        self._receiver.record(GRPC_METRICS_METHOD, dict(context.invocation_metadata()), request)
        return ExportMetricsServiceResponse()


@attrs.define(eq=False)
class GrpcReceiver(OtlpReceiver):
    """An OTLP/gRPC receiver (the Collector's port 4317), insecure, on a free port."""

    _server: Any = attrs.field(default=None, init=False)
    _executor: futures.ThreadPoolExecutor | None = attrs.field(default=None, init=False)
    _port: int = attrs.field(default=0, init=False)

    @property
    def endpoint(self) -> str:
        """The URL for a gRPC exporter; the ``http`` scheme makes it use an insecure channel."""
        if not self._port:
            raise RuntimeError("the receiver is not listening")
        return f"http://{HOST}:{self._port}"

    def start(self) -> None:
        """Start the gRPC server with both OTLP services."""
        self._executor = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc")
        server = grpc.server(self._executor, options=[("grpc.so_reuseport", 0)])
        add_TraceServiceServicer_to_server(_TraceService(self), server)  # type: ignore[no-untyped-call]
        add_MetricsServiceServicer_to_server(_MetricsService(self), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(f"{HOST}:0")
        if not port:
            raise RuntimeError(f"could not bind a gRPC port on {HOST}")
        server.start()
        self._server, self._port = server, port

    def stop(self) -> None:
        """Stop the server (one second of grace for in-flight exports), then its threads."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=1.0).wait(timeout=STOP_TIMEOUT)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# -- HTTP --------------------------------------------------------------------

_HTTP_ROUTES: Mapping[str, tuple[Any, Any]] = {
    HTTP_TRACES_PATH: (ExportTraceServiceRequest, ExportTraceServiceResponse),
    HTTP_METRICS_PATH: (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
}


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: HttpReceiver


class _OtlpHandler(BaseHTTPRequestHandler):
    """POST /v1/traces and /v1/metrics with protobuf bodies, as a Collector accepts them."""

    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

    def do_POST(self) -> None:
        route = _HTTP_ROUTES.get(self.path.split("?", 1)[0])
        if route is None:
            self._reply(404, b"unknown OTLP path", "text/plain")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != PROTOBUF:
            self._reply(415, b"only application/x-protobuf is supported", "text/plain")
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._reply(411, b"Content-Length required", "text/plain")
            return
        body = self.rfile.read(int(length))
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding != "identity":
                self._reply(415, f"unsupported Content-Encoding {encoding}".encode(), "text/plain")
                return
        except (OSError, EOFError, zlib.error):
            self._reply(400, b"body does not match its Content-Encoding", "text/plain")
            return
        request_type, response_type = route
        try:
            request = request_type.FromString(body)
        except DecodeError:
            self._reply(400, b"body is not a valid OTLP protobuf message", "text/plain")
            return
        server = cast("_HttpServer", self.server)
        server.receiver.record(self.path, dict(self.headers.items()), request)
        self._reply(200, response_type().SerializeToString(), PROTOBUF)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Keep the test output quiet."""


@attrs.define(eq=False)
class HttpReceiver(OtlpReceiver):
    """An OTLP/HTTP receiver with protobuf bodies (the Collector's port 4318), on a free port."""

    _server: _HttpServer | None = attrs.field(default=None, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)

    @property
    def endpoint(self) -> str:
        """The base URL; exporters post to ``<endpoint>/v1/traces`` and ``<endpoint>/v1/metrics``."""
        if self._server is None:
            raise RuntimeError("the receiver is not listening")
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> None:
        """Serve in a background thread."""
        server = _HttpServer((HOST, 0), _OtlpHandler)
        server.receiver = self
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-http", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()  # returns once serve_forever's loop (polling every 50 ms) has exited
            thread.join(timeout=STOP_TIMEOUT)
        server.server_close()


def create_receiver(protocol: Literal["grpc", "http"]) -> OtlpReceiver:
    """A receiver for ``protocol``, not started yet: use it as a context manager."""
    if protocol == "grpc":
        return GrpcReceiver()
    if protocol == "http":
        return HttpReceiver()
    raise ValueError(f"unknown OTLP protocol {protocol!r}")


# -- flattening ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SpanEvent:
    """A span event: its name and attributes."""

    name: str
    attributes: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class FlatSpan:
    """A span as it came over the wire, with ids in hex.

    Attributes:
        name: The span name.
        trace_id: 32 hex digits.
        span_id: 16 hex digits.
        parent_span_id: 16 hex digits, or ``""`` for a root span.
        attributes: The span attributes (arrays as lists).
        status_code: ``"UNSET"``, ``"OK"`` or ``"ERROR"``.
        status_message: The status description.
        events: The span events, in order.
        start_ns: Start time, nanoseconds since the epoch.
        end_ns: End time, nanoseconds since the epoch.
        scope: Name of the instrumentation scope (the tracer).
        scope_version: Version of the instrumentation scope.
        resource: Attributes of the resource the span was exported under.
    """

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: Mapping[str, Any]
    status_code: str
    status_message: str
    events: tuple[SpanEvent, ...]
    start_ns: int
    end_ns: int
    scope: str
    scope_version: str
    resource: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class DataPoint:
    """One data point of a metric stream.

    Attributes:
        attributes: The point's attributes.
        kind: The metric's data kind: ``"sum"``, ``"gauge"``, ``"histogram"``, …
        unit: The metric's unit.
        monotonic: For sums, whether the sum is monotonic (a counter).
        value: For sums and gauges, the value.
        count: For histograms, how many values were recorded.
        sum: For histograms, their sum.
        scope: Name of the instrumentation scope (the meter).
    """

    attributes: Mapping[str, Any]
    kind: str
    unit: str
    monotonic: bool | None = None
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    scope: str = ""


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (arrays as lists, key-value lists as dicts)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, which)


def attributes_dict(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP key-values as a dict."""
    return {kv.key: any_value(kv.value) for kv in attributes}


def flatten_spans(requests: Iterable[ExportTraceServiceRequest]) -> list[FlatSpan]:
    """Every span of ``requests``, in the order received."""
    found: list[FlatSpan] = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = attributes_dict(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        FlatSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=attributes_dict(span.attributes),
                            status_code=_STATUS_CODES.get(span.status.code, str(span.status.code)),
                            status_message=span.status.message,
                            events=tuple(
                                SpanEvent(name=e.name, attributes=attributes_dict(e.attributes)) for e in span.events
                            ),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            scope=scope_spans.scope.name,
                            scope_version=scope_spans.scope.version,
                            resource=resource,
                        )
                    )
    return found


def _points(metric: Metric, scope: str) -> list[DataPoint]:
    kind = metric.WhichOneof("data")
    unit = metric.unit
    if kind == "sum":
        return [
            DataPoint(
                attributes=attributes_dict(p.attributes),
                kind=kind,
                unit=unit,
                monotonic=metric.sum.is_monotonic,
                value=p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
                scope=scope,
            )
            for p in metric.sum.data_points
        ]
    if kind == "gauge":
        return [
            DataPoint(
                attributes=attributes_dict(p.attributes),
                kind=kind,
                unit=unit,
                value=p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
                scope=scope,
            )
            for p in metric.gauge.data_points
        ]
    if kind in ("histogram", "exponential_histogram", "summary"):
        data = getattr(metric, kind)
        return [
            DataPoint(
                attributes=attributes_dict(p.attributes), kind=kind, unit=unit, count=p.count, sum=p.sum, scope=scope
            )
            for p in data.data_points
        ]
    return []


def flatten_metrics(
    requests: Iterable[ExportMetricsServiceRequest], *, latest: bool = True
) -> dict[str, tuple[DataPoint, ...]]:
    """Metric name -> its data points, from ``requests`` in arrival order.

    Cumulative exporters send every stream again at each export (a flush, then
    the shutdown), so by default only the last point of each stream (metric
    name and attribute set) is kept; ``latest=False`` keeps them all.
    """
    streams: dict[str, dict[Any, DataPoint]] = {}
    every: dict[str, list[DataPoint]] = {}
    for request in requests:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    for point in _points(metric, scope_metrics.scope.name):
                        every.setdefault(metric.name, []).append(point)
                        key = tuple(sorted((k, repr(v)) for k, v in point.attributes.items()))
                        streams.setdefault(metric.name, {})[key] = point
    if not latest:
        return {name: tuple(points) for name, points in every.items()}
    return {name: tuple(by_key.values()) for name, by_key in streams.items()}


def resource_attributes(
    trace_requests: Sequence[ExportTraceServiceRequest] = (),
    metric_requests: Sequence[ExportMetricsServiceRequest] = (),
) -> list[dict[str, Any]]:
    """The attributes of every resource in the requests: those of spans first, then of metrics."""
    found = [attributes_dict(rs.resource.attributes) for r in trace_requests for rs in r.resource_spans]
    found.extend(attributes_dict(rm.resource.attributes) for r in metric_requests for rm in r.resource_metrics)
    return found

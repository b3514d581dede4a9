"""Installing an OpenTelemetry SDK that exports over OTLP (the ``otlp`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import attrs
from opentelemetry import metrics, trace
from opentelemetry.util.re import parse_env_headers

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["OtlpTelemetry", "configure_otlp"]

Protocol = Literal["grpc", "http", "http/protobuf"]

_MISSING_EXTRA = "pipekit.telemetry.configure_otlp needs the otlp extra: pip install 'pipekit[otlp]'"


@attrs.frozen(kw_only=True)
class OtlpTelemetry:
    """The SDK providers `configure_otlp` installed; flush them before exiting.

    Attributes:
        tracer_provider: The SDK tracer provider (batching span exporter).
        meter_provider: The SDK meter provider (periodic metric exporter).
        installed_globally: Whether they are the process-wide providers.
    """

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    installed_globally: bool

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything buffered now; True when both providers flushed in time.

        A True result does not prove the collector accepted the data: export
        errors are logged by the exporters, not raised.
        """
        traces = self.tracer_provider.force_flush(timeout_millis)
        metrics_flushed = self.meter_provider.force_flush(timeout_millis)
        return bool(traces and metrics_flushed)

    def shutdown(self) -> None:
        """Flush and stop both providers; call it once, when the application exits."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _resolve_protocol(protocol: str | None) -> Literal["grpc", "http"]:
    if protocol is None:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip() or "grpc"
        source = "OTEL_EXPORTER_OTLP_PROTOCOL"
    else:
        source = "protocol"
    if protocol == "grpc":
        return "grpc"
    if protocol in ("http", "http/protobuf"):
        return "http"
    raise ValueError(f"{source} must be 'grpc' or 'http/protobuf' (or 'http'), got {protocol!r}")


def _check_endpoint(endpoint: str) -> str:
    scheme = urlsplit(endpoint).scheme
    if scheme not in ("http", "https"):
        raise ValueError(
            f"endpoint {endpoint!r} needs a scheme: http://host:port (plain) or https://host:port (TLS), "
            "e.g. 'http://localhost:4317'"
        )
    return endpoint


def _headers(extra: Mapping[str, str] | None, protocol: str, signal: str) -> dict[str, str] | None:
    """The headers for one signal's exporter: the OTEL_* ones with ``extra`` on top.

    None when nothing was passed, so the exporter reads the environment
    itself. gRPC metadata keys must be lowercase.
    """
    if extra is None:
        return None
    merged: dict[str, str] = {}
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS"):
        merged.update(parse_env_headers(os.environ.get(name, ""), liberal=True))
    merged.update(extra)
    if protocol == "grpc":
        merged = {key.lower(): value for key, value in merged.items()}
    return merged


def _signal_endpoint(endpoint: str | None, protocol: str, signal: str) -> str | None:
    if endpoint is None:
        return None  # the exporter reads OTEL_EXPORTER_OTLP_[SIGNAL_]ENDPOINT itself
    if protocol == "http":
        # OTLP/HTTP exporters want the full URL of each signal.
        return f"{endpoint.rstrip('/')}/v1/{signal}"
    return endpoint


def configure_otlp(
    endpoint: str | None = None,
    *,
    service_name: str,
    protocol: Protocol | None = None,
    headers: Mapping[str, str] | None = None,
    install_global: bool = True,
    metric_export_interval: float | None = None,
) -> OtlpTelemetry:
    """Set up an OpenTelemetry SDK exporting traces and metrics over OTLP.

    Call it once at application start-up; pipekit itself never installs a
    provider. Standard ``OTEL_*`` environment variables apply where an argument
    is left out: ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_INSECURE`` (and the
    per-signal variants), ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_METRIC_EXPORT_INTERVAL``.

    Args:
        endpoint: The collector, e.g. ``"http://localhost:4317"`` for gRPC or
            ``"http://localhost:4318"`` for HTTP (the ``/v1/traces`` and
            ``/v1/metrics`` paths are added). None: from the environment, else
            the OTLP default for the protocol.
        service_name: The ``service.name`` resource attribute your runs appear
            under in Jaeger.
        protocol: ``"grpc"`` or ``"http"`` (``"http/protobuf"`` too: OTLP/HTTP
            with protobuf). None: ``OTEL_EXPORTER_OTLP_PROTOCOL``, else gRPC.
        headers: Extra headers for every export (authentication, say), added
            to those of ``OTEL_EXPORTER_OTLP_HEADERS``; names are lowercased
            for gRPC, whose metadata keys must be.
        install_global: Make these the process-wide providers (the default).
            With False, pass ``tracer_provider=``/``meter_provider=`` to
            `Pipeline.execute` or `Engine` yourself.
        metric_export_interval: Seconds between metric exports (60 by default,
            or ``OTEL_METRIC_EXPORT_INTERVAL`` in milliseconds).

    Returns:
        The providers, with ``shutdown()`` to flush them at exit.

    Raises:
        ImportError: If the ``otlp`` extra is not installed.
        ValueError: For an unknown protocol, or an endpoint without a scheme.
        RuntimeError: If ``install_global`` is set and an SDK provider is
            already installed globally (OpenTelemetry allows that only once).
    """
    wire = _resolve_protocol(protocol)
    if endpoint is not None:
        _check_endpoint(endpoint)
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if wire == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        raise ImportError(_MISSING_EXTRA) from exc

    if install_global:
        for current, kind in (
            (trace.get_tracer_provider(), "tracer"),
            (metrics.get_meter_provider(), "meter"),
        ):
            # Only the API's placeholders can still be replaced (OpenTelemetry
            # allows one set_*_provider per process).
            if type(current).__name__ not in ("ProxyTracerProvider", "_ProxyMeterProvider"):
                raise RuntimeError(
                    f"a global {kind} provider is already installed ({type(current).__name__}); OpenTelemetry "
                    "allows one per process. Use install_global=False and pass the providers to pipekit."
                )

    resource = Resource.create({SERVICE_NAME: service_name})
    span_exporter = OTLPSpanExporter(
        endpoint=_signal_endpoint(endpoint, wire, "traces"), headers=_headers(headers, wire, "traces")
    )
    metric_exporter = OTLPMetricExporter(
        endpoint=_signal_endpoint(endpoint, wire, "metrics"), headers=_headers(headers, wire, "metrics")
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    interval_ms: float | None = None
    if metric_export_interval is not None:
        interval_ms = metric_export_interval * 1000
    elif "OTEL_METRIC_EXPORT_INTERVAL" not in os.environ:
        interval_ms = 60_000
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval_ms)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    if install_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        if trace.get_tracer_provider() is not tracer_provider or metrics.get_meter_provider() is not meter_provider:
            tracer_provider.shutdown()
            meter_provider.shutdown()
            raise RuntimeError("another global OpenTelemetry provider was installed concurrently; nothing installed")
    return OtlpTelemetry(
        tracer_provider=tracer_provider, meter_provider=meter_provider, installed_globally=install_global
    )

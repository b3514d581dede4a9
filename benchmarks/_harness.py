"""Timing, memory and telemetry set-up shared by every scenario.

Timing rules, the same for every variant of every scenario:

* ``time.perf_counter`` around one whole run (a pipeline of N stages, N
  engine executions, ...), divided by N where a per-item figure is reported.
* Warm-up rounds first (caches, the plan, the instruments, interned
  attribute sets), then ``rounds`` timed rounds. The variants of a comparison
  run interleaved, round by round, in a rotating order, so drift and noise on
  a shared machine hit them alike; a ratio is the median of the per-round
  ratios, an overhead the median of the per-round differences.
* ``gc`` stays enabled (services run with it on, and a variant that allocates
  more pays for its collections), but everything allocated during set-up is
  collected and frozen (``gc.freeze``) before timing, and ``gc.collect()``
  runs before every round outside the timed region.
* Memory is measured in separate, untimed runs under ``tracemalloc``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog
from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import TracerProvider

ROOT = Path(__file__).resolve().parent.parent

Bench = Callable[[], Awaitable[object]]
Samples = dict[str, list[float]]

# -- settings -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Settings:
    """Sizes and repetitions of one run of the suite."""

    smoke: bool
    rounds: int
    warmup: int
    backends: tuple[str, ...] = ("asyncio", "trio")
    seq_stages: int = 1000
    par_stages: int = 10_000
    par_limit: int = 64
    dag_nodes: int = 1000
    dag_seed: int = 20240605
    engine_executions: int = 2000
    engine_workers: int = 64
    rollback_stages: int = 1000
    prefect_stages: int = 20


FULL = Settings(smoke=False, rounds=15, warmup=2)
SMOKE = Settings(
    smoke=True,
    rounds=1,
    warmup=0,
    seq_stages=20,
    par_stages=50,
    par_limit=8,
    dag_nodes=30,
    engine_executions=40,
    engine_workers=8,
    rollback_stages=20,
    prefect_stages=3,
)

# -- logging, as a service configures it ----------------------------------------------


def configure_logging() -> None:
    """Configure structlog the way a service does: JSON lines, WARNING and above.

    The lines go to ``os.devnull`` (so the table stays readable) but are still
    rendered: a warning costs what it costs in production. Without this,
    structlog's default prints every debug line, which would dominate.
    """
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.WriteLoggerFactory(file=sink),
        cache_logger_on_first_use=True,
    )


# -- telemetry ------------------------------------------------------------------------


class DiscardingExporter(SpanExporter):
    """A span exporter that drops every batch (the export itself is not what is measured)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@attrs.frozen(kw_only=True)
class Telemetry:
    """The providers a variant records with.

    ``None`` means the process-global ones, which are the API's no-op proxies
    (`assert_no_global_sdk` checks that no SDK was installed globally).
    """

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @property
    def on(self) -> bool:
        return self.tracer_provider is not None

    def tracer_provider_or_global(self) -> TracerProvider:
        return self.tracer_provider if self.tracer_provider is not None else trace.get_tracer_provider()

    def meter_provider_or_global(self) -> MeterProvider:
        return self.meter_provider if self.meter_provider is not None else metrics.get_meter_provider()

    def flush(self) -> None:
        """Export pending spans now, so a batch from one round is not paid for in the next."""
        if isinstance(self.tracer_provider, SdkTracerProvider):
            self.tracer_provider.force_flush()


OFF = Telemetry()


@contextmanager
def sdk_telemetry() -> Iterator[Telemetry]:
    """An SDK tracer provider (batch processor, discarding exporter) and an SDK meter provider.

    The meter provider's reader is in-memory and never collected: every
    measurement is aggregated, nothing is exported. Both are passed explicitly
    to whatever records; neither is installed globally.
    """
    tracer_provider = SdkTracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    meter_provider = SdkMeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        yield Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def assert_no_global_sdk() -> None:
    """Fail loudly if an SDK provider was installed process-wide ("telemetry off" must be the API's no-ops)."""
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    if not isinstance(tracer_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        raise RuntimeError(f"a global tracer provider is installed: {tracer_provider!r}")
    if type(meter_provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider"):
        raise RuntimeError(f"a global meter provider is installed: {meter_provider!r}")
    for variable in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER"):
        if os.environ.get(variable):
            raise RuntimeError(f"{variable} is set; unset it so telemetry off means no SDK")


# -- timing -----------------------------------------------------------------------------


def _settle() -> None:
    gc.collect()
    gc.freeze()


async def compare(
    variants: Mapping[str, Bench],
    settings: Settings,
    *,
    before_round: Callable[[], None] | None = None,
    rounds: int | None = None,
) -> Samples:
    """Time each variant ``rounds`` times, interleaved, after the warm-up; seconds per run."""
    names = list(variants)
    for _ in range(settings.warmup):
        for name in names:
            await variants[name]()
    _settle()
    samples: Samples = {name: [] for name in names}
    count = settings.rounds if rounds is None else rounds
    for r in range(count):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before_round is not None:
                before_round()
            gc.collect()
            fn = variants[name]
            start = time.perf_counter()
            await fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(samples: Samples, numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator``."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator], strict=True))


def paired_difference(samples: Samples, minuend: str, subtrahend: str) -> float:
    """Median over rounds of ``minuend - subtrahend`` (seconds)."""
    return statistics.median(a - b for a, b in zip(samples[minuend], samples[subtrahend], strict=True))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Min, median and max of a variant's samples, for the JSON."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@attrs.frozen(kw_only=True)
class Memory:
    """Memory a run allocated, from ``tracemalloc``, in bytes above what was traced before it."""

    peak: int
    retained: int


async def traced_memory(fn: Bench) -> Memory:
    """Run ``fn`` once under tracemalloc; what it returns is kept alive for ``retained``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = await fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return Memory(peak=peak - before, retained=current - before)


# -- results ------------------------------------------------------------------------


Kind = Literal["ratio", "overhead", "value"]


@attrs.frozen(kw_only=True)
class Row:
    """One line of the results table: pipekit against one baseline.

    ``kind`` says what ``result`` is: a ratio pipekit / baseline, an overhead
    in µs per item above the baseline, or a plain value in ``unit`` (for
    throughput and memory targets). ``baseline_value`` and ``pipekit_value``
    are in ``unit``.
    """

    scenario: str
    backend: str
    case: str
    baseline: str
    unit: str
    baseline_value: float | None
    pipekit_value: float
    kind: Kind
    result: float
    target: float | None = None
    higher_is_better: bool = False

    @property
    def status(self) -> str:
        if self.target is None:
            return "—"
        ok = self.result >= self.target if self.higher_is_better else self.result <= self.target
        return "PASS" if ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        for key in ("baseline_value", "pipekit_value", "result"):
            if isinstance(data[key], float):
                data[key] = round(data[key], 4 if abs(data[key]) < 10 else 1)
        data["status"] = self.status
        return data


# -- the machine ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def _commit() -> str:
    """The commit measured, and whether ``pipekit/`` differs from it (what is timed is the working tree)."""
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "pipekit")
    return f"{commit} (pipekit/ has uncommitted changes)" if changed and changed != "unknown" else commit


def describe_machine() -> dict[str, Any]:
    """CPU, cores, Python and the versions of everything measured."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in (
                "pipekit",
                "anyio",
                "trio",
                "opentelemetry-api",
                "opentelemetry-sdk",
                "tenacity",
                "structlog",
                "attrs",
            )
        },
        "commit": _commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def summarise(samples: Samples, scale: float) -> dict[str, dict[str, float]]:
    """Min, median and max of every variant, in seconds times ``scale`` (e.g. µs per stage)."""
    return {
        name: {key: round(value * scale, 3) for key, value in spread(values).items()}
        for name, values in samples.items()
    }


@attrs.frozen(kw_only=True)
class Scenario:
    """What one scenario on one backend produced: table rows and, for the JSON, the spreads."""

    rows: list[Row]
    details: dict[str, Any] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)

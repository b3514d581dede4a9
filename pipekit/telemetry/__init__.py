"""OpenTelemetry export for pipekit: install an SDK that ships spans and metrics over OTLP.

pipekit records through the OpenTelemetry API on every run; nothing is
exported until the application installs an SDK, for instance with
`configure_otlp`. The instrument and attribute names pipekit records are
listed in `INSTRUMENTS` and `ATTRIBUTES` (and in the tracing docs).
"""

from __future__ import annotations

from types import MappingProxyType

from pipekit._instrument import (
    ATTR_ATTEMPT,
    ATTR_DEPENDS_ON,
    ATTR_DRY_RUN,
    ATTR_ERROR_TYPE,
    ATTR_PIPELINE,
    ATTR_REQUEST_ID,
    ATTR_REQUEST_TYPE,
    ATTR_RETRY_DELAY,
    ATTR_STAGE,
    ATTR_STATUS,
)

from ._otlp import OtlpTelemetry as OtlpTelemetry
from ._otlp import configure_otlp as configure_otlp

__all__ = ("ATTRIBUTES", "INSTRUMENTS", "OtlpTelemetry", "configure_otlp")

#: Instrument name -> (kind, unit, attributes), as recorded on the ``pipekit`` meter.
INSTRUMENTS = MappingProxyType(
    {
        "pipekit.executions": ("counter", "{execution}", (ATTR_PIPELINE, ATTR_STATUS)),
        "pipekit.execution.duration": ("histogram", "s", (ATTR_PIPELINE, ATTR_STATUS)),
        "pipekit.stage.runs": ("counter", "{stage}", (ATTR_PIPELINE, ATTR_STAGE, ATTR_STATUS)),
        "pipekit.stage.duration": ("histogram", "s", (ATTR_PIPELINE, ATTR_STAGE, ATTR_STATUS)),
        "pipekit.stage.retries": ("counter", "{retry}", (ATTR_PIPELINE, ATTR_STAGE)),
        "pipekit.rollbacks": ("counter", "{rollback}", (ATTR_PIPELINE, ATTR_STAGE)),
        "pipekit.rollback.failures": ("counter", "{rollback}", (ATTR_PIPELINE, ATTR_STAGE)),
        "pipekit.hook.failures": ("counter", "{call}", (ATTR_PIPELINE,)),
        "pipekit.engine.executions.running": ("updowncounter", "{execution}", (ATTR_PIPELINE,)),
        "pipekit.engine.executions.queued": ("updowncounter", "{execution}", (ATTR_PIPELINE,)),
    }
)

#: Span attribute names pipekit sets.
ATTRIBUTES = (
    ATTR_PIPELINE,
    ATTR_REQUEST_ID,
    ATTR_REQUEST_TYPE,
    ATTR_DRY_RUN,
    ATTR_STAGE,
    ATTR_ATTEMPT,
    ATTR_STATUS,
    ATTR_DEPENDS_ON,
    ATTR_RETRY_DELAY,
    ATTR_ERROR_TYPE,
)

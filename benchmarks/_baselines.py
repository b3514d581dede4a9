"""The stages every scenario runs, and the baselines pipekit is measured against.

All variants of a scenario await the very same stage objects, so only the
orchestration around them differs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import anyio
import tenacity

import pipekit as pk

from ._harness import Telemetry

#: What the floors pass to ``execute``: the no-op stages never look at it.
NO_CONTEXT = cast(pk.StageContext, None)


class Noop(pk.BaseStage):
    """A stage that does nothing, so only orchestration is measured."""

    async def execute(self, ctx: pk.StageContext) -> None:
        return None


class Undoable(pk.BaseStage):
    """A no-op stage with a (no-op) rollback, so pipekit compensates it."""

    async def execute(self, ctx: pk.StageContext) -> None:
        return None

    async def rollback(self, ctx: pk.StageContext) -> None:
        return None


class BoomError(Exception):
    """What the failing stage raises."""


class Failing(pk.BaseStage):
    """A stage that always fails (and is not retried: it has no policy)."""

    async def execute(self, ctx: pk.StageContext) -> None:
        raise BoomError("the last stage fails")


def noops(n: int, prefix: str = "s") -> list[Noop]:
    return [Noop(f"{prefix}{i}") for i in range(n)]


def chain(
    name: str,
    stages: Sequence[pk.Stage],
    *,
    retry: pk.RetryPolicy | None = None,
    timeout: float | None = None,
) -> pk.Pipeline:
    """A sequential pipeline of ``stages``, planned up front."""
    pipeline = pk.Pipeline(name)
    for stage in stages:
        pipeline = pipeline.add_stage(stage, retry=retry, timeout=timeout)
    pipeline.plan()
    return pipeline


async def floor_loop(stages: Sequence[pk.Stage]) -> None:
    """The floor of a sequential pipeline: a plain loop awaiting the stages."""
    for stage in stages:
        await stage.execute(NO_CONTEXT)


class HandWritten:
    """What a user writes by hand for the features pipekit gives a sequential pipeline.

    Per stage: an OTel span from the same tracer provider (with the pipeline
    and stage as attributes), a tenacity ``AsyncRetrying`` (``sleep=anyio.sleep``,
    ``stop_after_attempt``) around the call, ``anyio.fail_after`` around each
    attempt, then a counter and a duration histogram recorded with
    attributes; one span around the whole pipeline. Instruments are created
    once, as any careful user does; attribute dicts are written inline, as
    users write them. With telemetry off the same calls hit the API's no-ops.

    Args:
        name: The pipeline name (a span and metric attribute).
        telemetry: Where spans and metrics go.
        attempts: ``stop_after_attempt`` for every stage.
        timeout: Seconds per attempt.
    """

    def __init__(self, name: str, telemetry: Telemetry, *, attempts: int, timeout: float) -> None:
        self.name = name
        self.attempts = attempts
        self.timeout = timeout
        self.tracer = telemetry.tracer_provider_or_global().get_tracer("handwritten")
        meter = telemetry.meter_provider_or_global().get_meter("handwritten")
        self.runs = meter.create_counter("stage.runs", unit="{stage}")
        self.duration = meter.create_histogram("stage.duration", unit="s")

    async def run_stage(self, stage: pk.Stage, ctx: pk.StageContext) -> Any:
        with self.tracer.start_as_current_span(
            f"stage {stage.name}", attributes={"pipeline": self.name, "stage": stage.name}
        ) as span:
            start = time.perf_counter()
            result: Any = None
            attempts = 0
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(self.attempts), sleep=anyio.sleep, reraise=True
            ):
                attempts = attempt.retry_state.attempt_number
                with attempt, anyio.fail_after(self.timeout):
                    result = await stage.execute(ctx)
            attributes = {"pipeline": self.name, "stage": stage.name, "status": "succeeded"}
            self.runs.add(1, attributes)
            self.duration.record(time.perf_counter() - start, attributes)
            span.set_attribute("status", "succeeded")
            span.set_attribute("attempt", attempts)
            return result

    async def run(self, stages: Sequence[pk.Stage]) -> None:
        with self.tracer.start_as_current_span(f"pipeline {self.name}", attributes={"pipeline": self.name}):
            for stage in stages:
                await self.run_stage(stage, NO_CONTEXT)


#: The baselines' short names, as the table shows them, and what each one is.
LEGEND = {
    "floor": "a plain loop awaiting the same stages",
    "hand-written": (
        "what a user writes by hand for the same features: per stage an OTel span, a tenacity "
        "`AsyncRetrying(stop=stop_after_attempt(3), sleep=anyio.sleep)` around `anyio.fail_after(30)` around "
        "the call, then a counter and a histogram recorded with attributes; one span around the whole run; "
        "telemetry off: the API's no-op providers"
    ),
    "hand-written + SDK": "the same, recording to the very SDK providers pipekit is given",
    "same, telemetry off": "the same pipekit pipeline, without an SDK",
    "task group": "a bare anyio task group spawning the same coroutines",
    "task group + Semaphore": "the same, each task holding an `anyio.Semaphore(limit)` around its call",
    "Event scheduler": "a task per node awaiting the `anyio.Event` of each dependency, then setting its own",
    "execute() directly": "the same pipeline run with `pipeline.execute()` by the same callers, no Engine",
    "loop + reverse rollbacks": "the stages awaited in a loop, then the same rollbacks awaited in reverse order",
    "Prefect 3 flow": "an async Prefect 3 flow awaiting one task per stage",
}

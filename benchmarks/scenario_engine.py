"""Scenario 5: throughput through ``Engine.execute``, and an end-to-end rollback.

Throughput: M executions of a single-stage pipeline, telemetry off, through
an Engine with ``max_concurrent=1`` (one caller, one execution at a time) and
``max_concurrent=64`` (64 callers in a task group, each awaiting
``engine.execute`` in a loop). The baseline is the same pipeline run with
``pipeline.execute()`` by the same callers, without an engine. The Engine's
start and shutdown are inside the timed region (amortised over M).

Rollback: a pipeline of R stages that each have a rollback, then a failing
stage; pipekit runs them, then compensates all R in reverse order. The floor
awaits the same stages in a loop, then the same rollbacks in reverse order.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

import pipekit as pk

from ._baselines import NO_CONTEXT, BoomError, Failing, Noop, Undoable, chain
from ._harness import Row, Scenario, Settings, compare, median, paired_ratio, summarise

ENGINE = "5 engine"
ROLLBACK = "5 rollback"


async def _in_workers(workers: int, total: int, call: pk.Pipeline, engine: pk.Engine | None) -> None:
    per_worker, extra = divmod(total, workers)

    async def worker(count: int) -> None:
        if engine is None:
            for _ in range(count):
                await call.execute()
        else:
            for _ in range(count):
                await engine.execute(call)

    async with anyio.create_task_group() as tg:
        for w in range(workers):
            tg.start_soon(worker, per_worker + (1 if w < extra else 0))


async def rollback_floor(stages: Sequence[Undoable], last: Failing) -> None:
    """Run the stages, fail, then await every rollback in reverse order."""
    done: list[Undoable] = []
    try:
        for stage in stages:
            await stage.execute(NO_CONTEXT)
            done.append(stage)
        await last.execute(NO_CONTEXT)
    except BoomError:
        for stage in reversed(done):
            await stage.rollback(NO_CONTEXT)


async def _check(settings: Settings, single: pk.Pipeline, saga: pk.Pipeline) -> None:
    """Make sure the measured runs do what they claim (once, untimed)."""
    async with pk.Engine(max_concurrent=1) as engine:
        response = await engine.execute(single)
    if response.status is not pk.Status.SUCCEEDED:
        raise RuntimeError(f"the engine benchmark's pipeline did not succeed: {response.summary()}")
    response = await saga.execute()
    rolled_back = sum(1 for r in response.stages.values() if r.rolled_back)
    if response.status is not pk.Status.FAILED or rolled_back != settings.rollback_stages:
        raise RuntimeError(f"the rollback benchmark rolled back {rolled_back} stages: {response.status}")


async def run(settings: Settings, backend: str) -> Scenario:
    m, workers = settings.engine_executions, settings.engine_workers
    single = chain("single", [Noop("only")])
    undoables = [Undoable(f"u{i}") for i in range(settings.rollback_stages)]
    last = Failing("fails")
    saga = chain("saga", [*undoables, last])
    await _check(settings, single, saga)

    async def direct_one() -> None:
        await _in_workers(1, m, single, None)

    async def engine_one() -> None:
        async with pk.Engine(max_concurrent=1) as engine:
            await _in_workers(1, m, single, engine)

    async def direct_many() -> None:
        await _in_workers(workers, m, single, None)

    async def engine_many() -> None:
        async with pk.Engine(max_concurrent=workers) as engine:
            await _in_workers(workers, m, single, engine)

    throughput = await compare(
        {
            "pipeline.execute, 1 caller": direct_one,
            "engine, max_concurrent=1": engine_one,
            f"pipeline.execute, {workers} callers": direct_many,
            f"engine, max_concurrent={workers}": engine_many,
        },
        settings,
    )

    async def floor() -> None:
        await rollback_floor(undoables, last)

    rollback = await compare({"floor": floor, "pipekit": saga.execute}, settings)

    def rate(name: str) -> float:
        return m / median(throughput[name])

    r = settings.rollback_stages
    rows = [
        Row(
            scenario=ENGINE,
            backend=backend,
            case=f"{m} runs, max_concurrent=1, 1 caller",
            baseline="execute() directly",
            unit="exec/s",
            baseline_value=rate("pipeline.execute, 1 caller"),
            pipekit_value=rate("engine, max_concurrent=1"),
            kind="value",
            result=rate("engine, max_concurrent=1"),
            target=5000.0,
            higher_is_better=True,
        ),
        Row(
            scenario=ENGINE,
            backend=backend,
            case=f"{m} runs, max_concurrent={workers}, {workers} callers",
            baseline="execute() directly",
            unit="exec/s",
            baseline_value=rate(f"pipeline.execute, {workers} callers"),
            pipekit_value=rate(f"engine, max_concurrent={workers}"),
            kind="value",
            result=rate(f"engine, max_concurrent={workers}"),
            target=5000.0,
            higher_is_better=True,
        ),
        # The cost of going through the Engine, as ratios of the time per
        # execution against calling execute() directly (no target).
        Row(
            scenario=ENGINE,
            backend=backend,
            case=f"{m} runs, max_concurrent=1, 1 caller: time per execution",
            baseline="execute() directly",
            unit="µs",
            baseline_value=median(throughput["pipeline.execute, 1 caller"]) / m * 1e6,
            pipekit_value=median(throughput["engine, max_concurrent=1"]) / m * 1e6,
            kind="ratio",
            result=paired_ratio(throughput, "engine, max_concurrent=1", "pipeline.execute, 1 caller"),
        ),
        Row(
            scenario=ENGINE,
            backend=backend,
            case=f"{m} runs, max_concurrent={workers}, {workers} callers: time per execution",
            baseline="execute() directly",
            unit="µs",
            baseline_value=median(throughput[f"pipeline.execute, {workers} callers"]) / m * 1e6,
            pipekit_value=median(throughput[f"engine, max_concurrent={workers}"]) / m * 1e6,
            kind="ratio",
            result=paired_ratio(
                throughput, f"engine, max_concurrent={workers}", f"pipeline.execute, {workers} callers"
            ),
        ),
        Row(
            scenario=ROLLBACK,
            backend=backend,
            case=f"{r} stages compensated after a failure",
            baseline="loop + reverse rollbacks",
            unit="ms",
            baseline_value=median(rollback["floor"]) * 1e3,
            pipekit_value=median(rollback["pipekit"]) * 1e3,
            kind="ratio",
            result=paired_ratio(rollback, "pipekit", "floor"),
        ),
    ]
    details = {
        "µs/execution": summarise(throughput, 1e6 / m),
        "rollback ms": summarise(rollback, 1e3),
    }
    return Scenario(rows=rows, details=details)

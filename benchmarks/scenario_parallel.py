"""Scenario 3: one parallel group of N no-op stages, with and without a limit.

The floor is a bare anyio task group spawning the same coroutines (and, for
the limited group, the same with an ``anyio.Semaphore``). Memory is the
``tracemalloc`` peak of one run, and what a finished run retains (pipekit's
response with its per-stage results), per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

import pipekit as pk

from ._baselines import NO_CONTEXT, noops
from ._harness import (
    Row,
    Scenario,
    Settings,
    compare,
    median,
    paired_ratio,
    summarise,
    traced_memory,
)

FAN_OUT = "3 fan-out"
KIB = 1024


async def task_group(stages: Sequence[pk.Stage]) -> None:
    async with anyio.create_task_group() as tg:
        for stage in stages:
            tg.start_soon(stage.execute, NO_CONTEXT)


async def _limited(sem: anyio.Semaphore, stage: pk.Stage) -> None:
    async with sem:
        await stage.execute(NO_CONTEXT)


async def task_group_limited(stages: Sequence[pk.Stage], limit: int) -> None:
    sem = anyio.Semaphore(limit)
    async with anyio.create_task_group() as tg:
        for stage in stages:
            tg.start_soon(_limited, sem, stage)


async def run(settings: Settings, backend: str) -> Scenario:
    n, limit = settings.par_stages, settings.par_limit
    stages = noops(n, "p")
    group = pk.Pipeline("fan-out").add_parallel_stages(*stages)
    group.plan()
    limited = pk.Pipeline("fan-out").add_parallel_stages(*stages, limit=limit)
    limited.plan()
    us = 1e6 / n

    async def bare() -> None:
        await task_group(stages)

    async def bare_limited() -> None:
        await task_group_limited(stages, limit)

    samples = await compare(
        {
            "task group": bare,
            "task group + semaphore": bare_limited,
            "pipekit": group.execute,
            f"pipekit, limit={limit}": limited.execute,
        },
        settings,
    )
    memory = {
        "task group": await traced_memory(bare),
        "pipekit": await traced_memory(group.execute),
        f"pipekit, limit={limit}": await traced_memory(limited.execute),
    }

    def kib(name: str, what: str) -> float:
        return float(getattr(memory[name], what)) / n / KIB

    case = f"N={n}"
    rows = [
        Row(
            scenario=FAN_OUT,
            backend=backend,
            case=f"{case}, no limit",
            baseline="task group",
            unit="µs/stage",
            baseline_value=median(samples["task group"]) * us,
            pipekit_value=median(samples["pipekit"]) * us,
            kind="ratio",
            result=paired_ratio(samples, "pipekit", "task group"),
            target=1.3,
        ),
        Row(
            scenario=FAN_OUT,
            backend=backend,
            case=f"{case}, limit={limit}",
            baseline="task group",
            unit="µs/stage",
            baseline_value=median(samples["task group"]) * us,
            pipekit_value=median(samples[f"pipekit, limit={limit}"]) * us,
            kind="ratio",
            result=paired_ratio(samples, f"pipekit, limit={limit}", "task group"),
            target=1.3,
        ),
        Row(
            scenario=FAN_OUT,
            backend=backend,
            case=f"{case}, limit={limit}",
            baseline="task group + Semaphore",
            unit="µs/stage",
            baseline_value=median(samples["task group + semaphore"]) * us,
            pipekit_value=median(samples[f"pipekit, limit={limit}"]) * us,
            kind="ratio",
            result=paired_ratio(samples, f"pipekit, limit={limit}", "task group + semaphore"),
        ),
        Row(
            scenario=FAN_OUT,
            backend=backend,
            case=f"{case}, no limit: peak memory above the floor's",
            baseline="task group",
            unit="KiB/stage",
            baseline_value=kib("task group", "peak"),
            pipekit_value=kib("pipekit", "peak"),
            kind="overhead",
            result=kib("pipekit", "peak") - kib("task group", "peak"),
            target=2.0,
        ),
        Row(
            scenario=FAN_OUT,
            backend=backend,
            case=f"{case}, no limit: memory kept per finished stage",
            baseline="task group",
            unit="KiB/stage",
            baseline_value=kib("task group", "retained"),
            pipekit_value=kib("pipekit", "retained"),
            kind="value",
            result=kib("pipekit", "retained"),
            target=2.0,
        ),
    ]
    details = {
        "µs/stage": summarise(samples, us),
        "KiB/stage": {name: {"peak": kib(name, "peak"), "retained": kib(name, "retained")} for name in memory},
    }
    return Scenario(rows=rows, details=details)

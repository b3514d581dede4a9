"""Optional peer for scenario 1: the same sequential no-op stages as a Prefect 3 flow of tasks.

Runs only where ``import prefect`` works (asyncio only; Prefect does not run
on trio), otherwise reports "skipped: prefect not installed". Prefect is never
a dependency of pipekit or of this suite. A Prefect task costs milliseconds,
so the flow is kept short (``Settings.prefect_stages``) and timed in fewer rounds.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._baselines import NO_CONTEXT, chain, noops
from ._harness import Row, Scenario, Settings, compare, median, paired_ratio, summarise

PEER = "1 peer: prefect"
ROUNDS = 3


def _load_prefect() -> Any:
    try:
        return importlib.import_module("prefect")
    except ImportError:
        return None


async def run(settings: Settings, backend: str) -> Scenario:
    prefect = _load_prefect()
    if prefect is None:
        return Scenario(rows=[], notes=["skipped: prefect not installed"])
    if backend != "asyncio":
        return Scenario(rows=[], notes=[f"skipped: prefect does not run on {backend}"])
    n = settings.prefect_stages
    stages = noops(n)
    pipeline = chain("sequential", stages)

    async def _one(i: int) -> None:
        await stages[i].execute(NO_CONTEXT)

    one = prefect.task(_one, name="noop")

    async def _flow() -> None:
        for i in range(n):
            await one(i)

    flow = prefect.flow(_flow, name="sequential")

    async def prefect_flow() -> None:
        await flow()

    try:
        samples = await compare(
            {"prefect flow": prefect_flow, "pipekit": pipeline.execute},
            settings,
            rounds=min(settings.rounds, ROUNDS),
        )
    except Exception as exc:  # a peer that cannot run here is reported, never fatal
        return Scenario(rows=[], notes=[f"skipped: prefect failed to run ({type(exc).__name__}: {exc})"])
    us = 1e6 / n
    row = Row(
        scenario=PEER,
        backend=backend,
        case=f"N={n}, no policies, telemetry off (Prefect {getattr(prefect, '__version__', '?')})",
        baseline="Prefect 3 flow",
        unit="µs/stage",
        baseline_value=median(samples["prefect flow"]) * us,
        pipekit_value=median(samples["pipekit"]) * us,
        kind="ratio",
        result=paired_ratio(samples, "pipekit", "prefect flow"),
    )
    return Scenario(rows=[row], details={"µs/stage": summarise(samples, us)})

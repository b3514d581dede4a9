"""Scenario 4: a random DAG of no-op stages (fixed seed, edges from lower to higher index).

The floor is the scheduler a careful user writes by hand: one task per node,
each waiting on the ``anyio.Event`` of every dependency, running its stage,
then setting its own event.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio

import pipekit as pk

from ._baselines import NO_CONTEXT, noops
from ._harness import Row, Scenario, Settings, compare, median, paired_ratio, summarise

GRAPH = "4 graph"
MAX_DEPS = 3


def random_dag(n: int, seed: int) -> list[tuple[int, ...]]:
    """The dependencies of each of ``n`` nodes: up to three earlier nodes, chosen at random."""
    rng = random.Random(seed)
    deps: list[tuple[int, ...]] = []
    for i in range(n):
        k = rng.randint(0, min(MAX_DEPS, i))
        deps.append(tuple(sorted(rng.sample(range(i), k))))
    return deps


def build(stages: Sequence[pk.Stage], deps: Sequence[tuple[int, ...]]) -> pk.Pipeline:
    pipeline = pk.Pipeline("dag")
    for stage, before in zip(stages, deps, strict=True):
        pipeline = pipeline.add_stage(stage, depends_on=[stages[j].name for j in before])
    pipeline.plan()
    return pipeline


async def _node(stage: pk.Stage, before: Sequence[anyio.Event], done: anyio.Event) -> None:
    for event in before:
        await event.wait()
    await stage.execute(NO_CONTEXT)
    done.set()


async def event_scheduler(stages: Sequence[pk.Stage], deps: Sequence[tuple[int, ...]]) -> None:
    """The hand-written floor: a task per node, waiting on its dependencies' events."""
    done = [anyio.Event() for _ in stages]
    async with anyio.create_task_group() as tg:
        for i, stage in enumerate(stages):
            tg.start_soon(_node, stage, [done[j] for j in deps[i]], done[i])


def _depth(deps: Sequence[tuple[int, ...]]) -> int:
    level: list[int] = []
    for before in deps:
        level.append(1 + max((level[j] for j in before), default=0))
    return max(level, default=0)


async def run(settings: Settings, backend: str) -> Scenario:
    n = settings.dag_nodes
    deps = random_dag(n, settings.dag_seed)
    stages = noops(n, "n")
    pipeline = build(stages, deps)
    us = 1e6 / n

    async def floor() -> None:
        await event_scheduler(stages, deps)

    samples = await compare({"event scheduler": floor, "pipekit": pipeline.execute}, settings)
    edges = sum(len(d) for d in deps)
    roots = sum(1 for d in deps if not d)
    rows = [
        Row(
            scenario=GRAPH,
            backend=backend,
            case=f"{n} nodes, {edges} edges, seed {settings.dag_seed}",
            baseline="Event scheduler",
            unit="µs/node",
            baseline_value=median(samples["event scheduler"]) * us,
            pipekit_value=median(samples["pipekit"]) * us,
            kind="ratio",
            result=paired_ratio(samples, "pipekit", "event scheduler"),
        )
    ]
    return Scenario(
        rows=rows, details={"µs/node": summarise(samples, us), "edges": edges, "roots": roots, "depth": _depth(deps)}
    )

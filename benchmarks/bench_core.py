"""Per-stage overhead of the core runner, each scenario against its floor in the same run.

Run with ``.venv/bin/python benchmarks/bench_core.py [--smoke]``. Prints a table
and writes ``benchmarks/results/core.json``. Ratios are what matter: absolute
times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

import pipekit as pk

# Measured as a service runs it: logging configured at WARNING (structlog's
# unconfigured default prints every debug line, which would dominate).
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


class Noop(pk.BaseStage):
    """A stage that does nothing, so only orchestration is measured."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    async def execute(self, ctx: pk.StageContext) -> None:
        return None


async def _median_seconds(fn: Callable[[], Awaitable[Any]], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def sequential(n: int, repeat: int) -> dict[str, float]:
    """N no-op stages in a chain vs a plain loop awaiting the same stages."""
    stages = [Noop(f"s{i}") for i in range(n)]
    pipeline = pk.Pipeline("sequential")
    for s in stages:
        pipeline = pipeline.add_stage(s)
    pipeline.plan()

    async def floor() -> None:
        for s in stages:
            await s.execute(None)  # type: ignore[arg-type]

    floor_s = await _median_seconds(floor, repeat)
    pipekit_s = await _median_seconds(pipeline.execute, repeat)
    return {
        "floor_us_per_stage": floor_s / n * 1e6,
        "pipekit_us_per_stage": pipekit_s / n * 1e6,
        "overhead_us_per_stage": (pipekit_s - floor_s) / n * 1e6,
    }


async def parallel(n: int, repeat: int) -> dict[str, float]:
    """One parallel group of N no-op stages vs a bare task group spawning them."""
    stages = [Noop(f"p{i}") for i in range(n)]
    pipeline = pk.Pipeline("parallel").add_parallel_stages(*stages)
    pipeline.plan()

    async def floor() -> None:
        async with anyio.create_task_group() as tg:
            for s in stages:
                tg.start_soon(s.execute, None)  # type: ignore[arg-type]

    floor_s = await _median_seconds(floor, repeat)
    pipekit_s = await _median_seconds(pipeline.execute, repeat)
    return {
        "floor_us_per_stage": floor_s / n * 1e6,
        "pipekit_us_per_stage": pipekit_s / n * 1e6,
        "ratio": pipekit_s / floor_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, just prove the scripts run")
    args = parser.parse_args()
    seq_n, par_n, repeat = (50, 200, 2) if args.smoke else (1000, 10_000, 15)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "scenarios": {},
    }
    for backend in ("asyncio", "trio"):
        results["scenarios"][f"sequential[{backend}]"] = anyio.run(sequential, seq_n, repeat, backend=backend)
        results["scenarios"][f"parallel[{backend}]"] = anyio.run(parallel, par_n, repeat, backend=backend)
    print(f"{'scenario':<22} {'floor µs/stage':>15} {'pipekit µs/stage':>17} {'ratio / overhead':>17}")
    for name, r in results["scenarios"].items():
        last = f"{r['ratio']:.2f}x" if "ratio" in r else f"+{r['overhead_us_per_stage']:.2f} µs"
        print(f"{name:<22} {r['floor_us_per_stage']:>15.2f} {r['pipekit_us_per_stage']:>17.2f} {last:>17}")
    if not args.smoke:
        out = Path(__file__).parent / "results" / "core.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

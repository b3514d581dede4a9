"""Scenario 9: the cost of recording the run history.

A sequential pipeline of N no-op stages, run with no hook, with a no-op
async hook (what any hook costs: every event is built and delivered), and
with a `pipekit.store.RunRecorder` on a `pipekit.store.SqliteStore` in a
temporary directory. Store and recorder are opened once, outside the timed
region, as a service keeps them; each timed round of the recorder runs the
pipeline, then awaits ``recorder.flush()``, so the cost of writing is counted
("until written"). The same round also notes when ``execute`` returned
("until the run returns": the hook's own cost, the writer's work done so
far included).

The no-op stages never yield to the event loop, so the recorder's writer
task gets to run only as the run ends: the whole run's rows are written in
one or two batches, from the store's worker thread, inside ``flush()``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pipekit as pk
from pipekit.store import RunRecorder, SqliteStore

from ._baselines import chain, noops
from ._harness import Row, Samples, Scenario, Settings, compare, median, paired_difference, paired_ratio, summarise

RECORDING = "9 recording"
NO_HOOK = "no hook"
NOOP_HOOK = "no-op hook"
UNTIL_WRITTEN = "recorder, until written"
UNTIL_RETURNED = "recorder, until the run returns"

#: The baselines' short names, as the table shows them, and what each one is.
LEGEND = {
    NO_HOOK: "the same pipeline run with `pipeline.execute()` and no hook",
    NOOP_HOOK: "the same with one async hook that does nothing (`async def hook(event): pass`)",
}


async def noop_hook(event: pk.Event) -> None:
    """A hook that does nothing: what delivering events costs by itself."""


class RecordedRun:
    """One timed round of the recorder variant: run, note the time, flush.

    Args:
        pipeline: What to run.
        recorder: The open recorder it reports to.
    """

    def __init__(self, pipeline: pk.Pipeline, recorder: RunRecorder) -> None:
        self.pipeline = pipeline
        self.recorder = recorder
        self.returned: list[float] = []  # seconds until execute() returned, one per call

    async def __call__(self) -> None:
        start = time.perf_counter()
        await self.pipeline.execute(hooks=[self.recorder])
        self.returned.append(time.perf_counter() - start)
        await self.recorder.flush()


async def _check(store: SqliteStore, recorder: RunRecorder, n: int, runs: int) -> None:
    """Make sure the measured runs were recorded in full (once, after timing)."""
    statistics = recorder.statistics()
    if statistics.runs != runs or statistics.pending or statistics.failures:
        raise RuntimeError(f"the recorder did not write every run: {statistics}")
    assert recorder.last_run_id is not None
    record = await store.get_run(recorder.last_run_id)
    succeeded = sum(1 for stage in record.stages if stage.status == pk.Status.SUCCEEDED.value)
    if record.status != pk.Status.SUCCEEDED.value or succeeded != n:
        raise RuntimeError(f"the last recorded run is {record.status} with {succeeded} of {n} stages succeeded")


async def run(settings: Settings, backend: str) -> Scenario:
    n = settings.seq_stages
    pipeline = chain("recorded", noops(n))
    with tempfile.TemporaryDirectory(prefix="pipekit-bench-") as directory:
        async with SqliteStore(Path(directory) / "runs.db") as store, RunRecorder(store, trigger="bench") as recorder:
            recorded = RecordedRun(pipeline, recorder)
            samples: Samples = await compare(
                {
                    NO_HOOK: pipeline.execute,
                    NOOP_HOOK: lambda: pipeline.execute(hooks=[noop_hook]),
                    UNTIL_WRITTEN: recorded,
                },
                settings,
            )
            await _check(store, recorder, n, settings.warmup + settings.rounds)
    # The warm-up rounds come first; the timed ones are aligned with the other variants' rounds.
    samples[UNTIL_RETURNED] = recorded.returned[settings.warmup :]

    us = 1e6 / n
    case = f"N={n} no-op stages"

    def overhead(variant: str, baseline: str, what: str, target: float | None = None) -> Row:
        return Row(
            scenario=RECORDING,
            backend=backend,
            case=f"{case}: {what}",
            baseline=baseline,
            unit="µs/stage",
            baseline_value=median(samples[baseline]) * us,
            pipekit_value=median(samples[variant]) * us,
            kind="overhead",
            result=paired_difference(samples, variant, baseline) * us,
            target=target,
        )

    def ratio(variant: str, baseline: str, what: str) -> Row:
        return Row(
            scenario=RECORDING,
            backend=backend,
            case=f"{case}: {what}",
            baseline=baseline,
            unit="µs/stage",
            baseline_value=median(samples[baseline]) * us,
            pipekit_value=median(samples[variant]) * us,
            kind="ratio",
            result=paired_ratio(samples, variant, baseline),
        )

    rows = [
        overhead(NOOP_HOOK, NO_HOOK, "one no-op hook"),
        overhead(UNTIL_RETURNED, NO_HOOK, "RunRecorder, until the run returns"),
        overhead(UNTIL_WRITTEN, NO_HOOK, "RunRecorder, until written (flush timed)", target=50.0),
        ratio(UNTIL_WRITTEN, NO_HOOK, "RunRecorder, until written (flush timed)"),
        ratio(UNTIL_WRITTEN, NOOP_HOOK, "RunRecorder, until written (flush timed)"),
    ]
    return Scenario(rows=rows, details={"µs/stage": summarise(samples, us)})

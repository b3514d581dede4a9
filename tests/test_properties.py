"""Property tests: compensation over random DAGs with random failures, on asyncio and trio.

Each example runs on the fake clock (`pipekit.testing.run_with_fake_clock`): stages and their
rollbacks take virtual time, so the interleavings vary with the drawn durations and no example
waits for real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipekit as pk
from pipekit.testing import MockStage, run_with_fake_clock

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)

DEADLOCK_GUARD = 10_000.0
"""Virtual seconds after which a run counts as stuck (a real run takes under 40)."""


class BoomError(Exception):
    """The failure a generated stage (or its rollback) raises."""


@dataclass(frozen=True)
class NodeSpec:
    """One generated stage: its dependencies (lower indices only) and behaviour."""

    deps: tuple[int, ...]
    fails: bool
    continue_on_error: bool
    skipped: bool
    rollback: bool
    rollback_fails: bool
    seconds: int
    undo_seconds: float


class GeneratedStage(MockStage):
    """A `MockStage` that also records how its execute ended (the kit's records only that it was called)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.completed = False
        self.raised = False

    async def execute(self, ctx: pk.StageContext) -> Any:
        try:
            output = await super().execute(ctx)
        except Exception:
            self.raised = True
            raise
        self.completed = True
        return output


@dataclass
class Observed:
    """What happened in one run of a generated DAG."""

    response: pk.PipelineResponse
    stages: list[GeneratedStage]

    @property
    def completed(self) -> set[int]:
        """Stages whose execute returned."""
        return {i for i, s in enumerate(self.stages) if s.completed}

    @property
    def raised(self) -> set[int]:
        """Stages whose execute raised."""
        return {i for i, s in enumerate(self.stages) if s.raised}

    @property
    def compensated(self) -> set[int]:
        """Stages whose rollback was called."""
        return {i for i, s in enumerate(self.stages) if s.rollbacks}

    @property
    def undo_errors(self) -> dict[int, BaseException]:
        """The errors the rollbacks that were called raised."""
        return {
            i: s.rollback_error
            for i, s in enumerate(self.stages)
            if s.rollbacks and isinstance(s.rollback_error, BaseException)
        }


def name(i: int) -> str:
    """The generated stage name for index ``i``."""
    return f"s{i}"


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True with probability 1/n."""
    return st.integers(min_value=1, max_value=n).map(lambda k: k == 1)


@st.composite
def dags(draw: st.DrawFn, *, failures: bool = True) -> tuple[NodeSpec, ...]:
    """Up to 8 stages; edges only from lower to higher index, so the graph is acyclic.

    A stage takes 0 to 3 virtual seconds. Its rollback takes a distinct power of two (1/16 s to
    8 s, so a chain of them stays within the default rollback timeout): every rollback then ends at
    an instant no other can (a distinct sum, exact in binary floating point), so comparing virtual
    times orders a rollback's start after another's end exactly.
    """
    size = draw(st.integers(min_value=1, max_value=8))
    powers = draw(st.permutations(range(size)))
    nodes: list[NodeSpec] = []
    for i in range(size):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=3)) if i else set()
        nodes.append(
            NodeSpec(
                deps=tuple(sorted(deps)),
                fails=failures and draw(one_in(4)),
                continue_on_error=draw(st.booleans()),
                skipped=draw(one_in(6)),
                rollback=not draw(one_in(4)),
                rollback_fails=failures and draw(one_in(6)),
                seconds=draw(st.integers(min_value=0, max_value=3)),
                undo_seconds=2 ** powers[i] / 16,
            )
        )
    return tuple(nodes)


def descendants(spec: tuple[NodeSpec, ...], i: int) -> set[int]:
    """Every stage that (transitively) depends on stage ``i``."""
    found: set[int] = set()
    for j in range(i + 1, len(spec)):
        if any(d == i or d in found for d in spec[j].deps):
            found.add(j)
    return found


def nearest_below(spec: tuple[NodeSpec, ...], i: int, among: set[int]) -> set[int]:
    """The stages of ``among`` nearest below ``i``: reached through its dependents, stopping at each one found."""
    found: set[int] = set()
    frontier = [j for j in range(i + 1, len(spec)) if i in spec[j].deps]
    visited: set[int] = set()
    while frontier:
        j = frontier.pop()
        if j in visited:
            continue
        visited.add(j)
        if j in among:
            found.add(j)
        else:
            frontier.extend(k for k in range(j + 1, len(spec)) if j in spec[k].deps)
    return found


async def run_dag(spec: tuple[NodeSpec, ...]) -> Observed:
    """Build the pipeline for ``spec`` from mock stages, run it, and return what they recorded."""
    stages = [
        GeneratedStage(
            name(i),
            delay=node.seconds,
            error=BoomError(name(i)) if node.fails else None,
            rollback_error=BoomError(f"undo {name(i)}") if node.rollback_fails else None,
            rollback=node.rollback,
            rollback_delay=node.undo_seconds,
        )
        for i, node in enumerate(spec)
    ]
    pipeline = pk.Pipeline("generated")
    for node, stage in zip(spec, stages, strict=True):
        depends_on = tuple(name(d) for d in node.deps)
        if node.skipped:
            pipeline = pipeline.add_conditional_stage(
                stage,
                lambda ctx: False,
                depends_on=depends_on,
                continue_on_error=node.continue_on_error,
            )
        else:
            pipeline = pipeline.add_stage(stage, depends_on=depends_on, continue_on_error=node.continue_on_error)
    with anyio.fail_after(DEADLOCK_GUARD):
        response = await pipeline.execute()
    return Observed(response=response, stages=stages)


def check_compensation(spec: tuple[NodeSpec, ...], seen: Observed) -> None:
    """Assert the rollback properties for one run."""
    stages = seen.stages
    compensated = seen.compensated
    counts = {i: len(stages[i].rollbacks) for i in compensated}
    assert all(n == 1 for n in counts.values()), f"compensated more than once: {counts}"

    # No uncompleted stage is compensated (skipped ones never even execute).
    assert compensated <= seen.completed
    assert not any(spec[i].skipped for i in seen.completed | seen.raised)
    assert all(stages[i].calls == [] for i, node in enumerate(spec) if node.skipped)

    hard_failure = any(not spec[i].continue_on_error for i in seen.raised)
    assert seen.response.ok is not hard_failure
    if seen.response.ok:
        assert compensated == set()
    else:
        # Every completed stage with a rollback is compensated, failing rollbacks notwithstanding.
        assert compensated == {i for i in seen.completed if spec[i].rollback}

    # A stage is compensated only after all its compensated descendants (see dags() on exactness).
    for i in compensated:
        for d in descendants(spec, i) & compensated:
            [started], [other] = stages[i].rollbacks, stages[d].rollbacks
            assert started.time >= other.time + spec[d].undo_seconds, f"{name(i)} undone before {name(d)}"

    # ... and not a moment later: independent branches are undone concurrently.
    if compensated:
        begin = min(stages[i].rollbacks[0].time for i in compensated)
        for i in compensated:
            ends = [stages[d].rollbacks[0].time + spec[d].undo_seconds for d in nearest_below(spec, i, compensated)]
            assert stages[i].rollbacks[0].time == max(ends, default=begin), f"{name(i)} undone late"

    undo_errors = seen.undo_errors
    for i in range(len(spec)):
        result = seen.response.stages[name(i)]
        undone = i in compensated and i not in undo_errors
        assert result.rolled_back is undone
        assert (result.status is pk.Status.ROLLED_BACK) is undone
        assert result.rollback_error is undo_errors.get(i)

    # Rollback errors are attached to the run's error, never replacing it.
    error = seen.response.error
    if undo_errors:
        assert isinstance(error, pk.StageFailedError)
        assert isinstance(error.rollback_error, pk.RollbackError)
        assert {id(e) for e in error.rollback_error.exceptions} == {id(e) for e in undo_errors.values()}
    elif error is not None:
        assert error.rollback_error is None


class TestCompensationProperties:
    @BACKENDS
    @PROPERTY_SETTINGS
    @given(spec=dags())
    def test_random_dags_with_random_failures(self, backend: str, spec: tuple[NodeSpec, ...]) -> None:
        """Completed stages with a rollback are undone exactly once, just after their dependents; nothing else is."""
        seen = run_with_fake_clock(run_dag, spec, backend=backend)
        check_compensation(spec, seen)

    @BACKENDS
    @PROPERTY_SETTINGS
    @given(spec=dags(failures=False))
    def test_nothing_fails_nothing_is_compensated(self, backend: str, spec: tuple[NodeSpec, ...]) -> None:
        """A run in which no stage fails succeeds and rolls nothing back; each stage starts as its dependencies end."""
        seen = run_with_fake_clock(run_dag, spec, backend=backend)
        assert seen.response.ok
        assert seen.compensated == set()
        assert all(s.rollbacks == [] for s in seen.stages)
        assert seen.completed == {i for i, node in enumerate(spec) if not node.skipped}
        ends: list[float] = []
        for i, node in enumerate(spec):
            start = max((ends[d] for d in node.deps), default=0.0)
            if not node.skipped:
                assert seen.stages[i].calls[0].time == start, f"{name(i)} did not start as its dependencies ended"
            ends.append(start if node.skipped else start + node.seconds)
        assert seen.response.duration == max(ends)

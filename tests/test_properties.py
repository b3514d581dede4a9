"""Property tests: compensation over random DAGs with random failures, on asyncio and trio."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipekit as pk

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)


class BoomError(Exception):
    """The failure a generated stage raises."""


@dataclass(frozen=True)
class NodeSpec:
    """One generated stage: its dependencies (lower indices only) and behaviour."""

    deps: tuple[int, ...]
    fails: bool
    continue_on_error: bool
    skipped: bool
    rollback: bool
    rollback_fails: bool
    checkpoints: int


@dataclass
class Observed:
    """What happened in one run of a generated DAG."""

    response: pk.PipelineResponse
    completed: set[int] = field(default_factory=set)
    raised: set[int] = field(default_factory=set)
    undo_log: list[tuple[str, int]] = field(default_factory=list)
    undo_errors: dict[int, Exception] = field(default_factory=dict)

    @property
    def compensated(self) -> list[int]:
        """Stages whose rollback was called, in call order."""
        return [i for what, i in self.undo_log if what == "start"]

    def position(self, what: str, i: int) -> int:
        """Where ``(what, i)`` is in the rollback log."""
        return self.undo_log.index((what, i))


def name(i: int) -> str:
    """The generated stage name for index ``i``."""
    return f"s{i}"


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True with probability 1/n."""
    return st.integers(min_value=1, max_value=n).map(lambda k: k == 1)


@st.composite
def dags(draw: st.DrawFn, *, failures: bool = True) -> tuple[NodeSpec, ...]:
    """Up to 8 stages; edges only from lower to higher index, so the graph is acyclic."""
    size = draw(st.integers(min_value=1, max_value=8))
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
                checkpoints=draw(st.integers(min_value=0, max_value=3)),
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


async def run_dag(spec: tuple[NodeSpec, ...]) -> Observed:
    """Build the pipeline for ``spec``, run it, and record executions and rollbacks."""
    completed: set[int] = set()
    raised: set[int] = set()
    undo_log: list[tuple[str, int]] = []
    undo_errors: dict[int, Exception] = {}

    def make(i: int, node: NodeSpec) -> pk.FunctionStage:
        async def execute(ctx: pk.StageContext) -> int:
            for _ in range(node.checkpoints):
                await anyio.lowlevel.checkpoint()
            if node.fails:
                raised.add(i)
                raise BoomError(name(i))
            completed.add(i)
            return i

        async def undo(ctx: pk.StageContext) -> None:
            undo_log.append(("start", i))
            try:
                for _ in range(node.checkpoints):
                    await anyio.lowlevel.checkpoint()
                if node.rollback_fails:
                    error = undo_errors[i] = BoomError(f"undo {name(i)}")
                    raise error
            finally:
                undo_log.append(("done", i))

        return pk.FunctionStage(name=name(i), fn=execute, rollback_fn=undo if node.rollback else None)

    pipeline = pk.Pipeline("generated")
    for i, node in enumerate(spec):
        depends_on = tuple(name(d) for d in node.deps)
        if node.skipped:
            pipeline = pipeline.add_conditional_stage(
                make(i, node),
                lambda ctx: False,
                depends_on=depends_on,
                continue_on_error=node.continue_on_error,
            )
        else:
            pipeline = pipeline.add_stage(
                make(i, node),
                depends_on=depends_on,
                continue_on_error=node.continue_on_error,
            )
    with anyio.fail_after(10):
        response = await pipeline.execute()
    return Observed(response=response, completed=completed, raised=raised, undo_log=undo_log, undo_errors=undo_errors)


def check_compensation(spec: tuple[NodeSpec, ...], seen: Observed) -> None:
    """Assert the rollback properties for one run."""
    compensated = seen.compensated
    counts = Counter(compensated)
    assert all(n == 1 for n in counts.values()), f"compensated more than once: {counts}"
    assert Counter(i for what, i in seen.undo_log if what == "done") == counts

    # No uncompleted stage is compensated (skipped ones never even execute).
    assert set(compensated) <= seen.completed
    assert not any(spec[i].skipped for i in seen.completed | seen.raised)

    hard_failure = any(not spec[i].continue_on_error for i in seen.raised)
    assert seen.response.ok is not hard_failure
    if seen.response.ok:
        assert compensated == []
    else:
        # Every completed stage with a rollback is compensated, failing rollbacks notwithstanding.
        assert set(compensated) == {i for i in seen.completed if spec[i].rollback}

    # A stage is compensated only after all its compensated descendants.
    for i in compensated:
        for d in descendants(spec, i) & set(compensated):
            assert seen.position("done", d) < seen.position("start", i), f"{name(i)} undone before {name(d)}"

    for i in range(len(spec)):
        result = seen.response.stages[name(i)]
        undone = i in counts and i not in seen.undo_errors
        assert result.rolled_back is undone
        assert (result.status is pk.Status.ROLLED_BACK) is undone
        assert result.rollback_error is seen.undo_errors.get(i)

    # Rollback errors are attached to the run's error, never replacing it.
    error = seen.response.error
    if seen.undo_errors:
        assert isinstance(error, pk.StageFailedError)
        assert isinstance(error.rollback_error, pk.RollbackError)
        assert {id(e) for e in error.rollback_error.exceptions} == {id(e) for e in seen.undo_errors.values()}
    elif error is not None:
        assert error.rollback_error is None


class TestCompensationProperties:
    @BACKENDS
    @PROPERTY_SETTINGS
    @given(spec=dags())
    def test_random_dags_with_random_failures(self, backend: str, spec: tuple[NodeSpec, ...]) -> None:
        """Completed stages with a rollback are undone exactly once, after their dependents; nothing else is."""
        seen = anyio.run(run_dag, spec, backend=backend)
        check_compensation(spec, seen)

    @BACKENDS
    @PROPERTY_SETTINGS
    @given(spec=dags(failures=False))
    def test_nothing_fails_nothing_is_compensated(self, backend: str, spec: tuple[NodeSpec, ...]) -> None:
        """A run in which no stage fails succeeds and rolls nothing back."""
        seen = anyio.run(run_dag, spec, backend=backend)
        assert seen.response.ok
        assert seen.undo_log == []
        assert seen.completed == {i for i, node in enumerate(spec) if not node.skipped}

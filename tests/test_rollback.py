"""Rollback (saga compensation): order, triggers, errors, shielding, atomic and nested pipelines, events.

The stages are `pipekit.testing.MockStage`s (see `Mock`), and every test runs on the fake clock
(asyncio and trio): timeouts and delays take no real time, and a stage with a ``HOUR`` delay is
simply in flight until something cancels it.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

import pipekit as pk
from pipekit.testing import (
    EventCapture,
    FakeClock,
    MockStage,
    assert_rolled_back,
    assert_stage_order,
    assert_status,
    capture_events,
)
from tests.helpers import Body, YieldingMock

pytestmark = pytest.mark.pipekit_clock


HOUR = 3600.0
"""Longer than any test waits: a stage (or rollback) taking this long is in flight until something cuts it off.

(Unlike ``sleep_forever`` it is a timer, so a broken timeout makes the test fail, not hang.)"""


class BoomError(Exception):
    """The failure a test stage raises."""


class UndoError(Exception):
    """The failure a test rollback raises."""


Mock = YieldingMock


def undo_start(stage: MockStage) -> float:
    """When the one rollback of ``stage`` started (virtual time)."""
    [call] = stage.rollbacks
    return call.time


def mocks(pipeline: pk.Pipeline) -> Iterator[MockStage]:
    """The mock stages of ``pipeline``, those of nested pipelines included."""
    for entry in pipeline.entries:
        if isinstance(entry.stage, MockStage):
            yield entry.stage
        elif isinstance(entry.stage, pk.Pipeline):
            yield from mocks(entry.stage)


def rollback_calls(pipeline: pk.Pipeline) -> dict[str, int]:
    """How often each mock stage of ``pipeline`` (nested ones included) had its rollback called, if at all."""
    return {m.name: len(m.rollbacks) for m in mocks(pipeline) if m.rollbacks}


def rollback_order(response: pk.PipelineResponse) -> list[str]:
    """The stages of the run that were rolled back successfully, in the order their rollbacks finished."""
    undone = [r for r in response.stages.values() if r.rolled_back]
    return [r.name for r in sorted(undone, key=lambda r: r.rollback_index if r.rollback_index is not None else -1)]


def undone(events: EventCapture) -> list[tuple[str, str | None]]:
    """(pipeline, stage) of every StageRolledBack event, in order: the order across nested runs too."""
    return [(e.pipeline, e.stage) for e in events.of(pk.StageRolledBack)]


def mutual_wait(timeout: float = 1.0) -> tuple[Body, Body]:
    """Two bodies that each finish only once the other has started: they must run concurrently."""
    first, second = anyio.Event(), anyio.Event()

    async def one() -> None:
        first.set()
        with anyio.fail_after(timeout):
            await second.wait()

    async def two() -> None:
        second.set()
        with anyio.fail_after(timeout):
            await first.wait()

    return one, two


class TestSequentialRollback:
    async def test_completed_stages_undone_in_reverse_order(self) -> None:
        """A failure rolls back the completed stages of a chain last-to-first."""
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(Mock("a"))
            .add_stage(Mock("b"))
            .add_stage(Mock("c"))
            .add_stage(Mock("d", error=BoomError))
        )
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert_rolled_back(response, ["c", "b", "a"], order=True)
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1}

    async def test_rolled_back_stages_report_it(self) -> None:
        """Compensated stages end ROLLED_BACK with rolled_back=True; the failed one stays FAILED."""
        pipeline = pk.Pipeline("seq").add_stage(Mock("a")).add_stage(Mock("b", error=BoomError))
        response = await pipeline.execute()
        a, b = response.stages["a"], response.stages["b"]
        assert (a.status, a.rolled_back, a.rollback_error) == (pk.Status.ROLLED_BACK, True, None)
        assert (b.status, b.rolled_back) == (pk.Status.FAILED, False)
        assert isinstance(b.error, BoomError)

    async def test_stages_after_the_failure_are_not_compensated(self) -> None:
        """Only stages that completed before the failure are undone; later ones never ran."""
        c = Mock("c")
        pipeline = pk.Pipeline("seq").add_stage(Mock("a")).add_stage(Mock("b", error=BoomError)).add_stage(c)
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert_stage_order(response, ["a", "b"])
        assert response.stages["c"].status is pk.Status.SKIPPED
        assert not response.stages["c"].rolled_back
        assert c.calls == []

    async def test_success_compensates_nothing(self) -> None:
        """A run that succeeds rolls nothing back."""
        pipeline = pk.Pipeline("seq").add_stage(Mock("a")).add_stage(Mock("b"))
        response = await pipeline.execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert rollback_calls(pipeline) == {}
        assert {r.status for r in response.stages.values()} == {pk.Status.SUCCEEDED}

    async def test_rollback_sees_its_own_output(self) -> None:
        """A rollback's context names its stage and exposes the output it has to undo."""
        create = Mock("create", output="create-out")
        pipeline = pk.Pipeline("seq").add_stage(create).add_stage(Mock("boom", error=BoomError))
        await pipeline.execute()
        [undo] = create.rollbacks
        assert undo.stage == "create"
        assert undo.outputs["create"] == "create-out"

    async def test_stage_without_rollback_keeps_the_order(self) -> None:
        """Chain a -> x (no rollback) -> c: x is skipped in compensation, and a is still undone after c."""
        x = MockStage("x", rollback=False)
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(Mock("a"))
            .add_stage(x)
            .add_stage(Mock("c"))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["c", "a"], order=True)
        assert rollback_calls(pipeline) == {"a": 1, "c": 1}
        assert len(x.calls) == 1
        result = response.stages["x"]
        assert (result.status, result.rolled_back) == (pk.Status.SUCCEEDED, False)

    async def test_class_stage_rollback_is_called(self) -> None:
        """A class-based stage implementing RollsBack is compensated."""
        undone: list[str] = []

        class Reserve(pk.BaseStage):
            name = "reserve"

            async def execute(self, ctx: pk.StageContext) -> int:
                return 42

            async def rollback(self, ctx: pk.StageContext) -> None:
                undone.append(ctx.stage)

        pipeline = pk.Pipeline("seq").add_stage(Reserve()).add_stage(Mock("boom", error=BoomError))
        response = await pipeline.execute()
        assert undone == ["reserve"]
        assert response.stages["reserve"].status is pk.Status.ROLLED_BACK

    async def test_retried_stage_is_compensated_once(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """A stage that succeeded on a retry is completed, and compensated exactly once."""
        flaky = Mock("flaky", output="ok", fail_times=1)
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(flaky, retry=pk.RetryPolicy(max_attempts=3, initial_delay=2, jitter=0))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert [c.attempt for c in flaky.calls] == [1, 2]
        assert [e.delay for e in pipekit_events.of(pk.StageRetrying)] == [2.0]
        assert [c.time for c in flaky.calls] == [0.0, 2.0]  # one back-off, of exactly 2 virtual seconds
        assert len(flaky.rollbacks) == 1
        assert response.stages["flaky"].status is pk.Status.ROLLED_BACK
        assert pipekit_clock.elapsed() == 2.0


class TestParallelRollback:
    async def test_every_member_is_compensated_before_the_stage_before_the_group(self) -> None:
        """All members of a completed parallel group are undone, and only then the stage they follow."""
        a, members = Mock("a"), [Mock(n, rollback_delay=1) for n in ("p1", "p2", "p3")]
        pipeline = (
            pk.Pipeline("par").add_stage(a).add_parallel_stages(*members).add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        order = rollback_order(response)
        assert sorted(order[:3]) == ["p1", "p2", "p3"]
        assert order[3:] == ["a"]
        assert rollback_calls(pipeline) == {"a": 1, "p1": 1, "p2": 1, "p3": 1}
        [start] = {undo_start(m) for m in members}  # together, each taking 1 s
        assert undo_start(a) == start + 1
        assert all(response.stages[n].status is pk.Status.ROLLED_BACK for n in ("a", "p1", "p2", "p3"))

    async def test_members_are_compensated_concurrently(self) -> None:
        """Two members' rollbacks each wait for the other to start: both finish only if run concurrently."""
        one, two = mutual_wait()
        pipeline = (
            pk.Pipeline("par")
            .add_parallel_stages(Mock("p1", undo=one), Mock("p2", undo=two))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["p1", "p2"])
        assert rollback_calls(pipeline) == {"p1": 1, "p2": 1}
        assert response.stages["p1"].rollback_error is None
        assert response.stages["p2"].rollback_error is None

    async def test_failing_member_leaves_cancelled_and_failed_members_alone(self, pipekit_clock: FakeClock) -> None:
        """A member failing cancels an in-flight sibling; only the member that completed is undone."""
        pipeline = (
            pk.Pipeline("par")
            .add_stage(Mock("a"))
            .add_parallel_stages(
                Mock("quick"),
                Mock("slow", delay=HOUR),
                Mock("bad", delay=1, error=BoomError),
            )
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["quick", "a"], order=True)
        assert rollback_calls(pipeline) == {"a": 1, "quick": 1}
        assert response.stages["slow"].status is pk.Status.CANCELLED
        assert response.stages["bad"].status is pk.Status.FAILED
        assert not response.stages["slow"].rolled_back
        assert not response.stages["bad"].rolled_back
        assert pipekit_clock.elapsed() == 1.0  # slow was cut off when bad failed


class TestGraphRollback:
    @staticmethod
    def diamond(**stages: MockStage) -> pk.Pipeline:
        """The diamond a -> b, a -> c, (b, c) -> d, then e (which fails) after d; ``stages`` replace default mocks."""
        s = {n: Mock(n) for n in ("a", "b", "c", "d")} | {"e": Mock("e", error=BoomError)} | stages
        return (
            pk.Pipeline("diamond")
            .add_stage(s["a"])
            .add_stage(s["b"], depends_on=("a",))
            .add_stage(s["c"], depends_on=("a",))
            .add_stage(s["d"], depends_on=("b", "c"))
            .add_stage(s["e"], depends_on=("d",))
        )

    async def test_diamond_is_compensated_in_reverse_dependency_order(self) -> None:
        """The join d is undone first, then b and c, then a last."""
        a, b, c, d = Mock("a"), Mock("b", rollback_delay=1), Mock("c", rollback_delay=1), Mock("d", rollback_delay=1)
        pipeline = self.diamond(a=a, b=b, c=c, d=d)
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        order = rollback_order(response)
        assert order[0] == "d"
        assert sorted(order[1:3]) == ["b", "c"]
        assert order[3:] == ["a"]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1, "d": 1}
        start = undo_start(d)  # each of d, b and c takes 1 s to undo
        assert (undo_start(b), undo_start(c), undo_start(a)) == (start + 1, start + 1, start + 2)

    async def test_root_waits_for_the_slower_branch(self) -> None:
        """The root a is undone only after both b and c, even when one branch's rollback takes longer."""
        a, b, c = Mock("a"), Mock("b", rollback_delay=5), Mock("c")
        response = await self.diamond(a=a, b=b, c=c).execute()
        assert rollback_order(response)[-1] == "a"
        assert undo_start(a) == undo_start(b) + 5  # a started the moment b's 5 s rollback finished
        assert undo_start(a) >= undo_start(c)

    async def test_branches_are_compensated_concurrently(self) -> None:
        """The rollbacks of b and c wait for each other, so they must run at the same time."""
        one, two = mutual_wait()
        pipeline = self.diamond(b=Mock("b", undo=one), c=Mock("c", undo=two))
        response = await pipeline.execute()
        assert_rolled_back(response, ["a", "b", "c", "d"])
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1, "d": 1}
        assert all(r.rollback_error is None for r in response.stages.values())

    async def test_failing_join_compensates_both_branches_then_the_root(self) -> None:
        """When d itself fails, b and c are undone, then a; d is not."""
        a, b, c = Mock("a"), Mock("b", rollback_delay=1), Mock("c", rollback_delay=1)
        pipeline = (
            pk.Pipeline("diamond")
            .add_stage(a)
            .add_stage(b, depends_on=("a",))
            .add_stage(c, depends_on=("a",))
            .add_stage(Mock("d", error=BoomError), depends_on=("b", "c"))
        )
        response = await pipeline.execute()
        order = rollback_order(response)
        assert sorted(order[:2]) == ["b", "c"]
        assert order[2:] == ["a"]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1}
        assert undo_start(a) == undo_start(b) + 1 == undo_start(c) + 1  # b and c together, 1 s each
        assert response.stages["d"].status is pk.Status.FAILED

    async def test_completed_branch_is_undone_when_the_other_fails(self) -> None:
        """Fork a -> b (fails), a -> c (completed first): c is undone, then a; b is not."""
        pipeline = (
            pk.Pipeline("fork")
            .add_stage(Mock("a"))
            .add_stage(Mock("b", delay=1, error=BoomError), depends_on=("a",))
            .add_stage(Mock("c"), depends_on=("a",))
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["c", "a"], order=True)
        assert rollback_calls(pipeline) == {"a": 1, "c": 1}

    async def test_middle_stage_without_rollback_still_orders_the_graph(self) -> None:
        """Graph a -> x (no rollback) -> {b, c}: a waits for b and c through x."""
        a, b = Mock("a"), Mock("b", rollback_delay=5)
        pipeline = (
            pk.Pipeline("graph")
            .add_stage(a)
            .add_stage(MockStage("x", rollback=False))
            .add_stage(b, depends_on=("x",))
            .add_stage(Mock("c"), depends_on=("x",))
            .add_stage(Mock("boom", error=BoomError), depends_on=("b", "c"))
        )
        response = await pipeline.execute()
        order = rollback_order(response)
        assert order[-1] == "a"
        assert sorted(order) == ["a", "b", "c"]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1}
        assert undo_start(a) == undo_start(b) + 5  # a started the moment b's rollback finished

    async def test_independent_roots_are_compensated_after_their_own_dependents_only(self) -> None:
        """Root r1's rollback does not wait for an unrelated root r2's dependents."""
        release = anyio.Event()

        async def wait_release() -> None:
            with anyio.fail_after(1):
                await release.wait()

        async def set_release() -> None:
            release.set()

        # r2's dependent s2 is undone only after r1 is undone: no deadlock iff r1 does not wait for s2.
        pipeline = (
            pk.Pipeline("roots")
            .add_stage(Mock("r1", undo=set_release), depends_on=())
            .add_stage(Mock("r2"), depends_on=())
            .add_stage(Mock("s2", undo=wait_release), depends_on=("r2",))
            .add_stage(Mock("boom", error=BoomError), depends_on=("r1", "s2"))
        )
        response = await pipeline.execute()
        order = rollback_order(response)
        assert sorted(order) == ["r1", "r2", "s2"]
        assert order.index("r2") > order.index("s2")
        assert rollback_calls(pipeline) == {"r1": 1, "r2": 1, "s2": 1}
        assert response.stages["s2"].rollback_error is None


class TestUncompletedStages:
    async def test_failed_stage_is_not_compensated(self) -> None:
        """The stage that failed is not rolled back."""
        b = Mock("b", error=BoomError)
        response = await pk.Pipeline("p").add_stage(Mock("a")).add_stage(b).execute()
        assert b.rollbacks == []
        assert not response.stages["b"].rolled_back

    async def test_skipped_stage_is_not_compensated(self) -> None:
        """A stage whose condition was false is not rolled back."""
        maybe = Mock("maybe")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_conditional_stage(maybe, when=lambda ctx: False)
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert maybe.calls == []
        assert response.stages["maybe"].status is pk.Status.SKIPPED

    async def test_stage_skipped_after_a_tolerated_failure_is_not_compensated(self) -> None:
        """A dependent of a failed continue_on_error stage is skipped, and not rolled back."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_stage(Mock("soft", error=BoomError), continue_on_error=True)
            .add_stage(Mock("dependent"), depends_on=("soft",))
            .add_stage(Mock("hard", delay=1, error=BoomError), depends_on=("a",))  # fails after soft did
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert response.stages["dependent"].status is pk.Status.SKIPPED
        assert not response.stages["soft"].rolled_back

    async def test_cancelled_and_never_started_stages_are_not_compensated(self) -> None:
        """A sibling cancelled by fail-fast and a stage that never started are not rolled back."""
        slow, later = Mock("slow", delay=HOUR), Mock("later")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_parallel_stages(slow, Mock("bad", delay=1, error=BoomError))
            .add_stage(later)
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert len(slow.calls) == 1
        assert response.stages["slow"].status is pk.Status.CANCELLED
        assert response.stages["later"].status is pk.Status.SKIPPED
        assert response.stages["later"].attempts == 0
        assert later.calls == []


class TestRollbackTriggers:
    async def test_stage_timeout_triggers_rollback(self, pipekit_clock: FakeClock) -> None:
        """A stage exceeding its timeout fails the run as TIMED_OUT, and earlier stages are undone."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("slow", delay=HOUR), timeout=5)
        response = await pipeline.execute()
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert pipekit_clock.elapsed() == 5.0

    async def test_pipeline_timeout_triggers_rollback(self, pipekit_clock: FakeClock) -> None:
        """The whole run exceeding the pipeline timeout undoes the completed stages."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("slow", delay=HOUR)).with_timeout(5)
        response = await pipeline.execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert not response.stages["slow"].rolled_back
        assert pipekit_clock.elapsed() == 5.0

    async def test_request_timeout_triggers_rollback(self, pipekit_clock: FakeClock) -> None:
        """A request's own timeout also triggers rollback."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("slow", delay=HOUR))
        request = pk.PipelineRequest(options=pk.RequestOptions(timeout=5))
        response = await pipeline.execute(request)
        assert_status(response, pk.Status.TIMED_OUT)
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert pipekit_clock.elapsed() == 5.0

    async def test_cancellation_triggers_rollback(self, pipekit_clock: FakeClock, pipekit_events: EventCapture) -> None:
        """Cancelling the caller mid-stage undoes the completed stages before the cancellation propagates."""
        slow = Mock("slow", delay=HOUR)
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(slow)
        returned: list[pk.PipelineResponse] = []
        async with anyio.create_task_group() as tg:

            async def runner() -> None:
                returned.append(await pipeline.execute())

            tg.start_soon(runner)
            await anyio.sleep(1)
            tg.cancel_scope.cancel()
        assert tg.cancel_scope.cancelled_caught
        assert returned == []
        assert len(slow.calls) == 1
        assert undone(pipekit_events) == [("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1}
        assert pipekit_clock.elapsed() == 1.0

    async def test_with_rollback_false_disables_compensation(self) -> None:
        """with_rollback(False): a failure leaves completed stages alone."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("boom", error=BoomError)).with_rollback(False)
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert rollback_calls(pipeline) == {}
        a = response.stages["a"]
        assert (a.status, a.rolled_back) == (pk.Status.SUCCEEDED, False)

    async def test_with_rollback_false_then_true_enables_it_again(self) -> None:
        """Builders return new values: re-enabling rollback works."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_stage(Mock("boom", error=BoomError))
            .with_rollback(False)
            .with_rollback(True)
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}

    async def test_validation_failure_triggers_rollback(self) -> None:
        """A later stage rejected by its validate() fails the run, and earlier stages are undone."""
        checked = Mock("checked", validate_error="no")
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(checked)
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}
        assert len(checked.validations) == 1
        assert checked.calls == []  # rejected stages never run


class TestRollbackErrors:
    @staticmethod
    def pipeline(error: Exception) -> pk.Pipeline:
        """Chain a -> b (rollback raises ``error``) -> c (fails)."""
        return (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_stage(Mock("b", rollback_error=error))
            .add_stage(Mock("c", error=BoomError))
        )

    async def test_original_failure_stays_the_error(self) -> None:
        """A rollback that raises does not replace the stage failure that caused it."""
        response = await self.pipeline(UndoError("b")).execute()
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "c"
        assert isinstance(response.error.__cause__, BoomError)
        with pytest.raises(pk.StageFailedError):
            response.raise_for_status()

    async def test_rollback_error_is_recorded_on_the_stage(self) -> None:
        """The stage whose rollback raised carries the error and is not marked rolled back."""
        error = UndoError("b")
        response = await self.pipeline(error).execute()
        b = response.stages["b"]
        assert b.rollback_error is error
        assert not b.rolled_back
        assert b.status is not pk.Status.ROLLED_BACK

    async def test_rollback_error_is_attached_to_the_run_error(self) -> None:
        """response.error.rollback_error is a RollbackError (an ExceptionGroup) holding the rollback error."""
        error = UndoError("b")
        response = await self.pipeline(error).execute()
        assert response.error is not None
        group = response.error.rollback_error
        assert isinstance(group, pk.RollbackError)
        assert isinstance(group, ExceptionGroup)
        assert isinstance(group, pk.PipekitError)
        assert list(group.exceptions) == [error]

    async def test_remaining_rollbacks_still_run(self) -> None:
        """The stage before the one whose rollback failed is still undone."""
        pipeline = self.pipeline(UndoError("b"))
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1, "b": 1}
        assert response.stages["a"].status is pk.Status.ROLLED_BACK

    async def test_every_rollback_error_is_collected(self) -> None:
        """Two failing rollbacks both end up in the group."""
        first, second = UndoError("x"), UndoError("y")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("x", rollback_error=first))
            .add_stage(Mock("y", rollback_error=second))
            .add_stage(Mock("z"))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert response.error is not None
        assert response.error.rollback_error is not None
        assert set(response.error.rollback_error.exceptions) == {first, second}
        assert_rolled_back(response, ["z"])
        assert rollback_calls(pipeline) == {"x": 1, "y": 1, "z": 1}

    async def test_no_rollback_error_when_rollbacks_succeed(self) -> None:
        """A clean compensation attaches no rollback error."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("b", error=BoomError))
        response = await pipeline.execute()
        assert response.error is not None
        assert response.error.rollback_error is None
        assert_rolled_back(response, ["a"])

    async def test_rollback_error_attaches_to_a_pipeline_timeout(self, pipekit_clock: FakeClock) -> None:
        """On a whole-run timeout the error stays a PipelineTimeoutError, carrying the rollback error."""
        error = UndoError("a")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a", rollback_error=error))
            .add_stage(Mock("slow", delay=HOUR))
            .with_timeout(5)
        )
        response = await pipeline.execute()
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.error.rollback_error is not None
        assert list(response.error.rollback_error.exceptions) == [error]
        assert pipekit_clock.elapsed() == 5.0

    async def test_rollback_error_attaches_to_a_cancellation(self, pipekit_events: EventCapture) -> None:
        """On cancellation the reported error stays a PipelineCancelledError, carrying the rollback error."""
        error = UndoError("a")
        pipeline = pk.Pipeline("p").add_stage(Mock("a", rollback_error=error)).add_stage(Mock("slow", delay=HOUR))
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.execute)
            await anyio.sleep(1)
            tg.cancel_scope.cancel()
        [event] = pipekit_events.of(pk.PipelineFinished)
        assert isinstance(event.error, pk.PipelineCancelledError)
        assert event.error.rollback_error is not None
        assert list(event.error.rollback_error.exceptions) == [error]

    async def test_rollback_timeout_bounds_a_hanging_rollback(self, pipekit_clock: FakeClock) -> None:
        """A rollback that hangs is cut off by the rollback timeout and recorded as a TimeoutError."""
        stuck = Mock("stuck", rollback_delay=HOUR)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(stuck, depends_on=())
            .add_stage(Mock("fine"), depends_on=())
            .add_stage(Mock("boom", error=BoomError), depends_on=("stuck", "fine"))
            .with_rollback(timeout=5)
        )
        response = await pipeline.execute()
        result = response.stages["stuck"]
        assert isinstance(result.rollback_error, TimeoutError)
        assert not result.rolled_back
        assert len(stuck.rollbacks) == 1
        assert_rolled_back(response, ["fine"])
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.rollback_error is not None
        assert result.rollback_error in response.error.rollback_error.exceptions
        assert pipekit_clock.elapsed() == 5.0


class TestRollbackShield:
    async def test_rollback_finishes_when_the_caller_is_cancelled_during_it(self, pipekit_events: EventCapture) -> None:
        """Cancelling the caller while a rollback runs does not interrupt that rollback."""
        in_rollback = anyio.Event()
        release = anyio.Event()

        async def wait_release() -> None:
            in_rollback.set()
            await release.wait()
            for _ in range(3):
                await anyio.lowlevel.checkpoint()

        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a"))
            .add_stage(Mock("b", undo=wait_release))
            .add_stage(Mock("boom", error=BoomError))
        )
        scope = anyio.CancelScope()

        async def runner() -> None:
            with scope:
                await pipeline.execute()
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await in_rollback.wait()
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert scope.cancelled_caught
        assert undone(pipekit_events) == [("p", "b"), ("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1}

    async def test_rollback_after_cancellation_is_shielded(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """Rollbacks that await run to completion even though the run itself was cancelled."""
        a = Mock("a", rollback_delay=1)
        b = Mock("b", rollback_delay=1)
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b).add_stage(Mock("slow", delay=HOUR))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipeline.execute)
                await anyio.sleep(1)
                scope.cancel()
        assert scope.cancelled_caught
        assert undone(pipekit_events) == [("p", "b"), ("p", "a")]
        assert (undo_start(b), undo_start(a)) == (1.0, 2.0)  # each slept its full second
        assert pipekit_clock.elapsed() == 3.0


class TestAtomicPipeline:
    async def test_failure_rolls_back_every_completed_stage(self) -> None:
        """Any failure undoes everything that completed, in reverse order."""
        a, b, c = Mock("a"), Mock("b", rollback_delay=1), Mock("c", rollback_delay=1)
        pipeline = (
            pk.AtomicPipeline("atomic").add_stage(a).add_parallel_stages(b, c).add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        order = rollback_order(response)
        assert sorted(order[:2]) == ["b", "c"]
        assert order[2:] == ["a"]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1, "c": 1}
        assert undo_start(a) == undo_start(b) + 1 == undo_start(c) + 1  # b and c together, 1 s each

    async def test_failed_response_has_no_outputs(self) -> None:
        """A failed atomic run reports no partial outputs, neither overall nor per stage."""
        pipeline = (
            pk.AtomicPipeline("atomic").add_stage(Mock("a", output="a-out")).add_stage(Mock("boom", error=BoomError))
        )
        response = await pipeline.execute()
        assert dict(response.outputs) == {}
        assert response.stages["a"].output is None

    async def test_successful_response_keeps_outputs(self) -> None:
        """A successful atomic run has every output and rolls nothing back."""
        pipeline = pk.AtomicPipeline("atomic").add_stage(Mock("a", output="a-out")).add_stage(Mock("b", output="b-out"))
        response = await pipeline.execute()
        assert dict(response.outputs) == {"a": "a-out", "b": "b-out"}
        assert rollback_calls(pipeline) == {}

    async def test_plain_pipeline_keeps_partial_outputs(self) -> None:
        """Contrast: a plain pipeline's failed response keeps the completed stages' outputs."""
        pipeline = pk.Pipeline("plain").add_stage(Mock("a", output="a-out")).add_stage(Mock("boom", error=BoomError))
        response = await pipeline.execute()
        assert dict(response.outputs) == {"a": "a-out"}

    async def test_rollback_cannot_be_disabled(self) -> None:
        """with_rollback(False) on an atomic pipeline is a definition error."""
        with pytest.raises(pk.PipelineDefinitionError):
            pk.AtomicPipeline("atomic").with_rollback(False)

    async def test_tolerated_failure_still_means_nothing(self) -> None:
        """All or nothing: a failed continue_on_error stage is either refused or rolls everything back."""
        try:
            pipeline = (
                pk.AtomicPipeline("atomic")
                .add_stage(Mock("a"))
                .add_stage(Mock("soft", error=BoomError), continue_on_error=True)
                .add_stage(Mock("c"), depends_on=("a",))
            )
        except pk.PipelineDefinitionError:
            return  # refusing the combination honours all-or-nothing too
        response = await pipeline.execute()
        assert not response.ok
        assert sorted(rollback_order(response)) == ["a", "c"]
        assert rollback_calls(pipeline) == {"a": 1, "c": 1}
        assert dict(response.outputs) == {}

    @staticmethod
    async def overlap(pipeline_type: type[pk.Pipeline]) -> tuple[int, list[pk.PipelineResponse]]:
        """Start two runs of one pipeline value; return how many were inside it at once, and the responses."""
        release = anyio.Event()
        active = 0
        peak = 0

        async def work(ctx: pk.StageContext) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                await release.wait()
            finally:
                active -= 1

        async def tail(ctx: pk.StageContext) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await anyio.lowlevel.checkpoint()
            active -= 1

        pipeline = (
            pipeline_type("shared")
            .add_stage(pk.FunctionStage(name="work", fn=work))
            .add_stage(pk.FunctionStage(name="tail", fn=tail))
        )
        responses: list[pk.PipelineResponse] = []

        async def one() -> None:
            responses.append(await pipeline.execute())

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                tg.start_soon(one)
                await anyio.wait_all_tasks_blocked()
                inside = active
                release.set()
        return max(peak, inside), responses

    async def test_concurrent_executions_are_serialised(self) -> None:
        """Two concurrent runs of the same atomic pipeline never overlap."""
        peak, responses = await self.overlap(pk.AtomicPipeline)
        assert peak == 1
        assert [r.ok for r in responses] == [True, True]

    async def test_plain_pipeline_executions_overlap(self) -> None:
        """Contrast (proves the measurement): two runs of a plain pipeline do overlap."""
        peak, responses = await self.overlap(pk.Pipeline)
        assert peak == 2
        assert [r.ok for r in responses] == [True, True]

    async def test_serialised_runs_include_rollback(self, pipekit_clock: FakeClock) -> None:
        """The second run starts only after the first one's rollback finished."""
        work = Mock("work", delay=1, rollback_delay=1)
        pipeline = pk.AtomicPipeline("atomic").add_stage(work).add_stage(Mock("boom", error=BoomError))
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.execute, pk.PipelineRequest(type="1"))
            tg.start_soon(pipeline.execute, pk.PipelineRequest(type="2"))
        # Each run: work takes 1 s, boom fails, the rollback of work takes 1 s.
        assert [c.time for c in work.calls] == [0.0, 2.0]
        assert [c.time for c in work.rollbacks] == [1.0, 3.0]
        first, second = (c.request_id for c in work.calls)
        assert first != second
        assert [c.request_id for c in work.rollbacks] == [first, second]
        assert pipekit_clock.elapsed() == 4.0


class TestNestedRollback:
    async def test_succeeded_inner_pipeline_is_compensated_by_a_later_failure(
        self, pipekit_events: EventCapture
    ) -> None:
        """Chain a -> inner(x -> y) -> b -> boom: undone b, y, x, a."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).add_stage(Mock("y"))
        outer = (
            pk.Pipeline("outer")
            .add_stage(Mock("a"))
            .add_stage(inner)
            .add_stage(Mock("b"))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await outer.execute()
        assert undone(pipekit_events) == [
            ("outer", "b"),
            ("inner", "y"),
            ("inner", "x"),
            ("outer", "inner"),
            ("outer", "a"),
        ]
        assert rollback_calls(outer) == {"a": 1, "b": 1, "x": 1, "y": 1}
        result = response.stages["inner"]
        assert (result.status, result.rolled_back) == (pk.Status.ROLLED_BACK, True)

    async def test_inner_failure_compensates_the_inner_stages_once(self, pipekit_events: EventCapture) -> None:
        """An inner failure undoes the inner stages, then the outer run undoes its own; each once."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).add_stage(Mock("y")).add_stage(Mock("z", error=BoomError))
        outer = pk.Pipeline("outer").add_stage(Mock("a")).add_stage(inner)
        response = await outer.execute()
        assert undone(pipekit_events) == [("inner", "y"), ("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1, "y": 1}
        assert_status(response, pk.Status.FAILED)
        result = response.stages["inner"]
        assert (result.status, result.rolled_back) == (pk.Status.FAILED, False)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "inner"

    async def test_inner_pipeline_cancelled_by_a_sibling_compensates_itself(self, pipekit_events: EventCapture) -> None:
        """An inner pipeline cancelled by fail-fast undoes the inner stages that completed, once."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).add_stage(Mock("stuck", delay=HOUR))
        outer = (
            pk.Pipeline("outer").add_stage(Mock("a")).add_parallel_stages(inner, Mock("bad", delay=1, error=BoomError))
        )
        response = await outer.execute()
        assert undone(pipekit_events) == [("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1}
        assert response.stages["inner"].status is pk.Status.CANCELLED

    async def test_inner_pipeline_timing_out_compensates_itself(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """An inner pipeline cut off by its stage timeout undoes its completed stages, then the outer ones."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).add_stage(Mock("stuck", delay=HOUR))
        outer = pk.Pipeline("outer").add_stage(Mock("a")).add_stage(inner, timeout=5)
        response = await outer.execute()
        assert undone(pipekit_events) == [("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1}
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["inner"].status is pk.Status.TIMED_OUT
        assert pipekit_clock.elapsed() == 5.0

    async def test_inner_pipeline_in_a_timed_out_run_compensates_itself(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """When the outer run times out inside an inner pipeline, inner then outer stages are undone."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).add_stage(Mock("stuck", delay=HOUR))
        outer = pk.Pipeline("outer").add_stage(Mock("a")).add_stage(inner).with_timeout(5)
        response = await outer.execute()
        assert undone(pipekit_events) == [("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1}
        assert_status(response, pk.Status.TIMED_OUT)
        assert pipekit_clock.elapsed() == 5.0

    async def test_retried_inner_pipeline_compensates_each_attempt_once(self, pipekit_events: EventCapture) -> None:
        """A failed first attempt undoes itself; the successful second one is undone by the later failure."""
        x, y = Mock("x"), Mock("y", fail_times=1)
        inner = pk.Pipeline("inner").add_stage(x).add_stage(y)
        outer = (
            pk.Pipeline("outer")
            .add_stage(Mock("a"))
            .add_stage(inner, retry=pk.RetryPolicy(max_attempts=2, jitter=0))
            .add_stage(Mock("boom", error=BoomError))
        )
        response = await outer.execute()
        succeeded = [(e.pipeline, e.stage) for e in pipekit_events.of(pk.StageSucceeded)]
        assert succeeded == [("outer", "a"), ("inner", "x"), ("inner", "x"), ("inner", "y"), ("outer", "inner")]
        assert undone(pipekit_events) == [
            ("inner", "x"),
            ("inner", "y"),
            ("inner", "x"),
            ("outer", "inner"),
            ("outer", "a"),
        ]
        assert rollback_calls(outer) == {"a": 1, "x": 2, "y": 1}
        assert [c.time for c in x.calls] == [0.0, 1.0]  # the second attempt after the 1 s back-off
        assert response.stages["inner"].attempts == 2
        assert response.stages["inner"].status is pk.Status.ROLLED_BACK

    async def test_inner_pipeline_without_rollback_is_not_compensated(self) -> None:
        """An inner pipeline built with_rollback(False) is left alone by the outer compensation."""
        inner = pk.Pipeline("inner").add_stage(Mock("x")).with_rollback(False)
        outer = pk.Pipeline("outer").add_stage(Mock("a")).add_stage(inner).add_stage(Mock("boom", error=BoomError))
        response = await outer.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(outer) == {"a": 1}
        assert response.stages["inner"].status is pk.Status.SUCCEEDED

    async def test_inner_rollback_error_is_reported_on_the_inner_stage(self, pipekit_events: EventCapture) -> None:
        """An inner rollback failure surfaces as a RollbackError on the outer stage result."""
        error = UndoError("x")
        inner = pk.Pipeline("inner").add_stage(Mock("x", rollback_error=error)).add_stage(Mock("y"))
        outer = pk.Pipeline("outer").add_stage(Mock("a")).add_stage(inner).add_stage(Mock("boom", error=BoomError))
        response = await outer.execute()
        result = response.stages["inner"]
        assert isinstance(result.rollback_error, pk.RollbackError)
        assert list(result.rollback_error.exceptions) == [error]
        assert undone(pipekit_events) == [("inner", "y"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1, "y": 1}
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "boom"


def position(events: EventCapture, kind: type[pk.Event], stage: str | None = None) -> int:
    """Index of the first captured event of ``kind`` (for ``stage``, when given)."""
    for k, e in enumerate(events):
        if isinstance(e, kind) and (stage is None or e.stage == stage):
            return k
    raise AssertionError(f"no {kind.__name__} event for {stage!r}")


class TestRollbackEvents:
    async def test_rollback_events_in_order(self, pipekit_events: EventCapture) -> None:
        """RollbackStarted, then one StageRolledBack per stage, then RollbackFinished, then PipelineFinished."""
        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("b")).add_stage(Mock("boom", error=BoomError))
        request = pk.PipelineRequest()
        await pipeline.execute(request)
        [started] = pipekit_events.of(pk.RollbackStarted)
        assert set(started.stages) == {"a", "b"}
        assert [e.stage for e in pipekit_events.of(pk.StageRolledBack)] == ["b", "a"]
        [finished] = pipekit_events.of(pk.RollbackFinished)
        assert (finished.rolled_back, finished.failed) == (2, 0)
        assert (
            position(pipekit_events, pk.StageFailed, "boom")
            < position(pipekit_events, pk.RollbackStarted)
            < position(pipekit_events, pk.StageRolledBack, "b")
            < position(pipekit_events, pk.StageRolledBack, "a")
            < position(pipekit_events, pk.RollbackFinished)
            < position(pipekit_events, pk.PipelineFinished)
        )
        rollback_events = [
            *pipekit_events.of(pk.RollbackStarted),
            *pipekit_events.of(pk.StageRolledBack),
            *pipekit_events.of(pk.RollbackFinished),
        ]
        assert {(e.request_id, e.pipeline) for e in rollback_events} == {(request.id, "p")}

    async def test_failed_rollback_emits_stage_rollback_failed(self, pipekit_events: EventCapture) -> None:
        """A rollback that raises emits StageRollbackFailed with the error, counted in RollbackFinished."""
        error = UndoError("a")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("a", rollback_error=error))
            .add_stage(Mock("b"))
            .add_stage(Mock("boom", error=BoomError))
        )
        await pipeline.execute()
        [failed] = pipekit_events.of(pk.StageRollbackFailed)
        assert (failed.stage, failed.error) == ("a", error)
        assert [e.stage for e in pipekit_events.of(pk.StageRolledBack)] == ["b"]
        [finished] = pipekit_events.of(pk.RollbackFinished)
        assert (finished.rolled_back, finished.failed) == (1, 1)

    async def test_rollback_timeout_emits_stage_rollback_failed(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """A rollback cut off by the rollback timeout emits StageRollbackFailed with a TimeoutError."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Mock("stuck", rollback_delay=HOUR))
            .add_stage(Mock("boom", error=BoomError))
            .with_rollback(timeout=5)
        )
        await pipeline.execute()
        [failed] = pipekit_events.of(pk.StageRollbackFailed)
        assert failed.stage == "stuck"
        assert isinstance(failed.error, TimeoutError)
        assert pipekit_clock.elapsed() == 5.0

    async def test_no_rollback_events_on_success(self, pipekit_events: EventCapture) -> None:
        """A successful run emits no rollback events."""
        await pk.Pipeline("p").add_stage(Mock("a")).execute()
        assert [e for e in pipekit_events if "rollback" in e.kind or "rolled" in e.kind] == []
        assert pipekit_events.of(pk.PipelineFinished)[0].status is pk.Status.SUCCEEDED

    async def test_no_rollback_events_without_anything_to_undo(self, pipekit_events: EventCapture) -> None:
        """A failure with nothing compensable emits no rollback events."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a", rollback=False)).add_stage(Mock("b", error=BoomError))
        await pipeline.execute()
        assert pipekit_events.of(pk.RollbackStarted) == []
        assert pipekit_events.of(pk.RollbackFinished) == []

    async def test_pipeline_hooks_also_see_rollback_events(self) -> None:
        """Hooks attached to the pipeline with with_hooks receive the rollback events too."""
        seen: list[pk.Event] = []

        async def hook(event: pk.Event) -> None:
            seen.append(event)

        pipeline = pk.Pipeline("p").add_stage(Mock("a")).add_stage(Mock("boom", error=BoomError))
        await pipeline.with_hooks(hook).execute()
        assert [e.stage for e in seen if isinstance(e, pk.StageRolledBack)] == ["a"]

    async def test_nested_rollback_events_name_the_inner_pipeline(self, pipekit_events: EventCapture) -> None:
        """Compensating an inner pipeline emits its stages' StageRolledBack under the inner pipeline's name."""
        inner = pk.Pipeline("inner").add_stage(Mock("x"))
        outer = pk.Pipeline("outer").add_stage(inner).add_stage(Mock("boom", error=BoomError))
        await outer.execute()
        assert set(undone(pipekit_events)) == {("inner", "x"), ("outer", "inner")}


class TestRollbackTimeoutErrors:
    """Rollbacks that run out of time say whether they hung or never started."""

    async def test_hung_and_waiting_rollbacks(self, pipekit_clock: FakeClock) -> None:
        """The hung rollback 'did not finish'; the one waiting behind it 'did not start', naming it."""
        a, b = Mock("a"), Mock("b", rollback_delay=HOUR)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(a)
            .add_stage(b)
            .add_stage(Mock("c", error=BoomError("c broke")))
            .with_rollback(timeout=5)
        )
        response = await pipeline.execute()
        b_error = response.stages["b"].rollback_error
        a_error = response.stages["a"].rollback_error
        assert isinstance(b_error, pk.RollbackTimeoutError)
        assert "did not finish within the 5s rollback timeout" in str(b_error)
        assert isinstance(a_error, pk.RollbackTimeoutError)
        assert a_error.waiting_for == ("b",)
        assert "did not start" in str(a_error)
        assert a.rollbacks == []
        assert len(b.rollbacks) == 1
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.rollback_error is not None
        assert set(response.error.rollback_error.exceptions) == {a_error, b_error}
        assert pipekit_clock.elapsed() == 5.0


class TestReviewRegressions:
    """Long chains, nested rollbacks cut short, and what a response keeps alive."""

    async def test_long_chain_without_rollbacks_between(self) -> None:
        """A rollback across 2,000 stages without rollbacks reaches the first stage (no recursion limit)."""
        first = MockStage("first")
        pipeline = pk.Pipeline("long").add_stage(first)
        for i in range(2000):
            pipeline = pipeline.add_stage(MockStage(f"s{i}", rollback=False))
        pipeline = pipeline.add_stage(MockStage("last", error="boom"))
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert_rolled_back(response, ["first"])
        assert len(first.rollbacks) == 1

    @pytest.mark.pipekit_clock
    async def test_nested_rollback_cut_short_is_recorded(self, pipekit_clock: FakeClock) -> None:
        """When the outer rollback timeout cuts a nested pipeline's rollback, its stages still get errors."""
        with capture_events() as events:
            inner = pk.Pipeline("inner").add_stage(MockStage("i0")).add_stage(MockStage("i1", rollback_delay=10))
            outer = (
                pk.Pipeline("outer")
                .add_stage(MockStage("o0"))
                .add_stage(inner)
                .add_stage(MockStage("f", error="boom"))
                .with_rollback(timeout=1)
            )
            response = await outer.execute()
        assert_status(response, pk.Status.FAILED)
        failed = {e.stage for e in events.of(pk.StageRollbackFailed) if e.pipeline == "inner"}
        assert "i1" in failed
        assert any(e.pipeline == "inner" for e in events.of(pk.RollbackFinished))

    async def test_response_does_not_keep_the_run_alive(self) -> None:
        """Values stages put in the context are freed once the run is over, whatever the response is kept for."""
        import gc
        import weakref

        class Blob:
            pass

        refs: list[weakref.ref[Blob]] = []

        @pk.stage
        async def put(ctx: pk.StageContext) -> str:
            blob = Blob()
            refs.append(weakref.ref(blob))
            ctx["blob"] = blob
            return "ok"

        responses = [await pk.Pipeline("p").add_stage(put).execute() for _ in range(3)]
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
        assert all(r.stages["put"].output == "ok" for r in responses)

    async def test_stage_results_pickle_as_a_dict(self) -> None:
        """response.stages pickles (and deep-copies) as a plain mapping of results."""
        import copy
        import pickle

        response = await pk.Pipeline("p").add_stage(MockStage("a", output=1)).execute()
        restored = pickle.loads(pickle.dumps(response.stages))
        assert restored == dict(response.stages)
        assert copy.deepcopy(response.stages) == dict(response.stages)

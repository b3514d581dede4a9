"""Rollback (saga compensation): order, triggers, errors, shielding, atomic and nested pipelines, events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest

import pipekit as pk

E = TypeVar("E", bound=pk.Event)

Body = Callable[[], Awaitable[None]]


class BoomError(Exception):
    """The failure a test stage raises."""


class UndoError(Exception):
    """The failure a test rollback raises."""


class Saga:
    """Builds stages that record their executions and their rollbacks.

    ``undone`` lists stages whose rollback finished, in order; ``undo_log``
    records ``("start", name)`` and ``("end", name)`` for each rollback.
    """

    def __init__(self) -> None:
        self.executed: list[str] = []
        self.undone: list[str] = []
        self.undo_log: list[tuple[str, str]] = []
        self.undo_contexts: dict[str, pk.StageContext] = {}
        self.undo_outputs: dict[str, Any] = {}

    def stage(
        self,
        name: str,
        *,
        fail: bool = False,
        rollback: bool = True,
        body: Body | None = None,
        undo_body: Body | None = None,
        undo_error: Exception | None = None,
    ) -> pk.FunctionStage:
        """A stage named ``name`` returning ``"<name>-out"`` (or raising :class:`BoomError`)."""

        async def execute(ctx: pk.StageContext) -> str:
            await anyio.lowlevel.checkpoint()
            if body is not None:
                await body()
            if fail:
                raise BoomError(name)
            self.executed.append(name)
            return f"{name}-out"

        async def undo(ctx: pk.StageContext) -> None:
            self.undo_log.append(("start", name))
            self.undo_contexts[name] = ctx
            self.undo_outputs[name] = ctx.outputs.get(name)
            await anyio.lowlevel.checkpoint()
            if undo_body is not None:
                await undo_body()
            if undo_error is not None:
                raise undo_error
            self.undone.append(name)
            self.undo_log.append(("end", name))

        return pk.FunctionStage(name=name, fn=execute, rollback_fn=undo if rollback else None)

    def started_before_end(self, later: str, earlier: str) -> bool:
        """Whether ``later``'s rollback started before ``earlier``'s finished."""
        return self.undo_log.index(("start", later)) < self.undo_log.index(("end", earlier))


class Recorder:
    """An async hook collecting every event of a run."""

    def __init__(self) -> None:
        self.events: list[pk.Event] = []

    async def __call__(self, event: pk.Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        """The recorded events of one kind, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def position(self, kind: type[pk.Event], stage: str | None = None) -> int:
        """Index of the first event of ``kind`` (for ``stage``, when given)."""
        for k, e in enumerate(self.events):
            if isinstance(e, kind) and (stage is None or e.stage == stage):
                return k
        raise AssertionError(f"no {kind.__name__} event for {stage!r}")


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


async def hang() -> None:
    await anyio.sleep_forever()


class TestSequentialRollback:
    async def test_completed_stages_undone_in_reverse_order(self) -> None:
        """A failure rolls back the completed stages of a chain last-to-first."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b"))
            .add_stage(saga.stage("c"))
            .add_stage(saga.stage("d", fail=True))
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert saga.undone == ["c", "b", "a"]

    async def test_rolled_back_stages_report_it(self) -> None:
        """Compensated stages end ROLLED_BACK with rolled_back=True; the failed one stays FAILED."""
        saga = Saga()
        pipeline = pk.Pipeline("seq").add_stage(saga.stage("a")).add_stage(saga.stage("b", fail=True))
        response = await pipeline.execute()
        a, b = response.stages["a"], response.stages["b"]
        assert (a.status, a.rolled_back, a.rollback_error) == (pk.Status.ROLLED_BACK, True, None)
        assert (b.status, b.rolled_back) == (pk.Status.FAILED, False)
        assert isinstance(b.error, BoomError)

    async def test_stages_after_the_failure_are_not_compensated(self) -> None:
        """Only stages that completed before the failure are undone; later ones never ran."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b", fail=True))
            .add_stage(saga.stage("c"))
        )
        response = await pipeline.execute()
        assert saga.undone == ["a"]
        assert response.stages["c"].status is pk.Status.SKIPPED
        assert not response.stages["c"].rolled_back
        assert "c" not in saga.executed

    async def test_success_compensates_nothing(self) -> None:
        """A run that succeeds rolls nothing back."""
        saga = Saga()
        pipeline = pk.Pipeline("seq").add_stage(saga.stage("a")).add_stage(saga.stage("b"))
        response = await pipeline.execute()
        assert response.ok
        assert saga.undo_log == []
        assert {r.status for r in response.stages.values()} == {pk.Status.SUCCEEDED}

    async def test_rollback_sees_its_own_output(self) -> None:
        """A rollback's context names its stage and exposes the output it has to undo."""
        saga = Saga()
        pipeline = pk.Pipeline("seq").add_stage(saga.stage("create")).add_stage(saga.stage("boom", fail=True))
        await pipeline.execute()
        assert saga.undo_contexts["create"].stage == "create"
        assert saga.undo_outputs["create"] == "create-out"

    async def test_stage_without_rollback_keeps_the_order(self) -> None:
        """Chain a -> x (no rollback) -> c: x is skipped in compensation, and a is still undone after c."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("x", rollback=False))
            .add_stage(saga.stage("c"))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert saga.undone == ["c", "a"]
        x = response.stages["x"]
        assert (x.status, x.rolled_back) == (pk.Status.SUCCEEDED, False)

    async def test_class_stage_rollback_is_called(self) -> None:
        """A class-based stage implementing RollsBack is compensated."""
        undone: list[str] = []

        class Reserve(pk.BaseStage):
            name = "reserve"

            async def execute(self, ctx: pk.StageContext) -> int:
                return 42

            async def rollback(self, ctx: pk.StageContext) -> None:
                undone.append(ctx.stage)

        saga = Saga()
        pipeline = pk.Pipeline("seq").add_stage(Reserve()).add_stage(saga.stage("boom", fail=True))
        response = await pipeline.execute()
        assert undone == ["reserve"]
        assert response.stages["reserve"].status is pk.Status.ROLLED_BACK

    async def test_retried_stage_is_compensated_once(self) -> None:
        """A stage that succeeded on a retry is completed, and compensated exactly once."""
        calls: list[int] = []
        undone: list[int] = []
        delays: list[float] = []

        async def flaky(ctx: pk.StageContext) -> str:
            calls.append(ctx.attempt)
            if ctx.attempt == 1:
                raise BoomError("first attempt")
            return "ok"

        async def undo(ctx: pk.StageContext) -> None:
            undone.append(ctx.attempt)

        async def fake_sleep(seconds: float) -> None:
            delays.append(seconds)

        saga = Saga()
        pipeline = (
            pk.Pipeline("seq")
            .add_stage(
                pk.FunctionStage(name="flaky", fn=flaky, rollback_fn=undo),
                retry=pk.RetryPolicy(max_attempts=3, sleep=fake_sleep),
            )
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert calls == [1, 2]
        assert len(delays) == 1
        assert len(undone) == 1
        assert response.stages["flaky"].status is pk.Status.ROLLED_BACK


class TestParallelRollback:
    async def test_every_member_is_compensated_before_the_stage_before_the_group(self) -> None:
        """All members of a completed parallel group are undone, and only then the stage they follow."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("par")
            .add_stage(saga.stage("a"))
            .add_parallel_stages(saga.stage("p1"), saga.stage("p2"), saga.stage("p3"))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert sorted(saga.undone[:3]) == ["p1", "p2", "p3"]
        assert saga.undone[3:] == ["a"]
        assert all(response.stages[n].status is pk.Status.ROLLED_BACK for n in ("a", "p1", "p2", "p3"))

    async def test_members_are_compensated_concurrently(self) -> None:
        """Two members' rollbacks each wait for the other to start: both finish only if run concurrently."""
        one, two = mutual_wait()
        saga = Saga()
        pipeline = (
            pk.Pipeline("par")
            .add_parallel_stages(saga.stage("p1", undo_body=one), saga.stage("p2", undo_body=two))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert sorted(saga.undone) == ["p1", "p2"]
        assert response.stages["p1"].rollback_error is None
        assert response.stages["p2"].rollback_error is None

    async def test_failing_member_leaves_cancelled_and_failed_members_alone(self) -> None:
        """A member failing cancels an in-flight sibling; only the member that completed is undone."""
        quick_done = anyio.Event()

        async def signal() -> None:
            quick_done.set()

        async def after_quick() -> None:
            await quick_done.wait()

        saga = Saga()
        pipeline = (
            pk.Pipeline("par")
            .add_stage(saga.stage("a"))
            .add_parallel_stages(
                saga.stage("quick", body=signal),
                saga.stage("slow", body=hang),
                saga.stage("bad", fail=True, body=after_quick),
            )
        )
        response = await pipeline.execute()
        assert saga.undone == ["quick", "a"]
        assert response.stages["slow"].status is pk.Status.CANCELLED
        assert response.stages["bad"].status is pk.Status.FAILED
        assert not response.stages["slow"].rolled_back
        assert not response.stages["bad"].rolled_back


class TestGraphRollback:
    @staticmethod
    def diamond(saga: Saga, **bodies: Body) -> pk.Pipeline:
        """The diamond a -> b, a -> c, (b, c) -> d, then e (which fails) after d."""
        return (
            pk.Pipeline("diamond")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b", undo_body=bodies.get("b")), depends_on=("a",))
            .add_stage(saga.stage("c", undo_body=bodies.get("c")), depends_on=("a",))
            .add_stage(saga.stage("d"), depends_on=("b", "c"))
            .add_stage(saga.stage("e", fail=True), depends_on=("d",))
        )

    async def test_diamond_is_compensated_in_reverse_dependency_order(self) -> None:
        """The join d is undone first, then b and c, then a last."""
        saga = Saga()
        response = await self.diamond(saga).execute()
        assert response.status is pk.Status.FAILED
        assert saga.undone[0] == "d"
        assert sorted(saga.undone[1:3]) == ["b", "c"]
        assert saga.undone[3] == "a"

    async def test_root_waits_for_the_slower_branch(self) -> None:
        """The root a is undone only after both b and c, even when one branch's rollback takes longer."""
        saga = Saga()

        async def slow() -> None:
            for _ in range(20):
                await anyio.lowlevel.checkpoint()

        await self.diamond(saga, b=slow).execute()
        assert saga.undone[-1] == "a"
        assert not saga.started_before_end("a", "b")
        assert not saga.started_before_end("a", "c")

    async def test_branches_are_compensated_concurrently(self) -> None:
        """The rollbacks of b and c wait for each other, so they must run at the same time."""
        one, two = mutual_wait()
        saga = Saga()
        response = await self.diamond(saga, b=one, c=two).execute()
        assert sorted(saga.undone) == ["a", "b", "c", "d"]
        assert all(r.rollback_error is None for r in response.stages.values())

    async def test_failing_join_compensates_both_branches_then_the_root(self) -> None:
        """When d itself fails, b and c are undone, then a; d is not."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("diamond")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b"), depends_on=("a",))
            .add_stage(saga.stage("c"), depends_on=("a",))
            .add_stage(saga.stage("d", fail=True), depends_on=("b", "c"))
        )
        response = await pipeline.execute()
        assert sorted(saga.undone[:2]) == ["b", "c"]
        assert saga.undone[2:] == ["a"]
        assert response.stages["d"].status is pk.Status.FAILED

    async def test_completed_branch_is_undone_when_the_other_fails(self) -> None:
        """Fork a -> b (fails), a -> c (completed first): c is undone, then a; b is not."""
        c_done = anyio.Event()

        async def signal() -> None:
            c_done.set()

        async def wait_for_c() -> None:
            await c_done.wait()

        saga = Saga()
        pipeline = (
            pk.Pipeline("fork")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b", fail=True, body=wait_for_c), depends_on=("a",))
            .add_stage(saga.stage("c", body=signal), depends_on=("a",))
        )
        await pipeline.execute()
        assert saga.undone == ["c", "a"]

    async def test_middle_stage_without_rollback_still_orders_the_graph(self) -> None:
        """Graph a -> x (no rollback) -> {b, c}: a waits for b and c through x."""
        saga = Saga()

        async def slow() -> None:
            for _ in range(20):
                await anyio.lowlevel.checkpoint()

        pipeline = (
            pk.Pipeline("graph")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("x", rollback=False))
            .add_stage(saga.stage("b", undo_body=slow), depends_on=("x",))
            .add_stage(saga.stage("c"), depends_on=("x",))
            .add_stage(saga.stage("boom", fail=True), depends_on=("b", "c"))
        )
        await pipeline.execute()
        assert saga.undone[-1] == "a"
        assert sorted(saga.undone) == ["a", "b", "c"]

    async def test_independent_roots_are_compensated_after_their_own_dependents_only(self) -> None:
        """Root r1's rollback does not wait for an unrelated root r2's dependents."""
        saga = Saga()
        release = anyio.Event()

        async def wait_release() -> None:
            with anyio.fail_after(1):
                await release.wait()

        async def set_release() -> None:
            release.set()

        # r2's dependent s2 is undone only after r1 is undone: no deadlock iff r1 does not wait for s2.
        pipeline = (
            pk.Pipeline("roots")
            .add_stage(saga.stage("r1", undo_body=set_release), depends_on=())
            .add_stage(saga.stage("r2"), depends_on=())
            .add_stage(saga.stage("s2", undo_body=wait_release), depends_on=("r2",))
            .add_stage(saga.stage("boom", fail=True), depends_on=("r1", "s2"))
        )
        response = await pipeline.execute()
        assert sorted(saga.undone) == ["r1", "r2", "s2"]
        assert saga.undone.index("r2") > saga.undone.index("s2")
        assert response.stages["s2"].rollback_error is None


class TestUncompletedStages:
    async def test_failed_stage_is_not_compensated(self) -> None:
        """The stage that failed is not rolled back."""
        saga = Saga()
        response = await pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("b", fail=True)).execute()
        assert "b" not in {name for _, name in saga.undo_log}
        assert not response.stages["b"].rolled_back

    async def test_skipped_stage_is_not_compensated(self) -> None:
        """A stage whose condition was false is not rolled back."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_conditional_stage(saga.stage("maybe"), when=lambda ctx: False)
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert saga.undone == ["a"]
        assert response.stages["maybe"].status is pk.Status.SKIPPED

    async def test_stage_skipped_after_a_tolerated_failure_is_not_compensated(self) -> None:
        """A dependent of a failed continue_on_error stage is skipped, and not rolled back."""
        tolerated = anyio.Event()

        async def mark() -> None:
            tolerated.set()

        async def after_tolerated() -> None:
            await tolerated.wait()

        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("soft", fail=True, body=mark), continue_on_error=True)
            .add_stage(saga.stage("dependent"), depends_on=("soft",))
            .add_stage(saga.stage("hard", fail=True, body=after_tolerated), depends_on=("a",))
        )
        response = await pipeline.execute()
        assert saga.undone == ["a"]
        assert response.stages["dependent"].status is pk.Status.SKIPPED
        assert not response.stages["soft"].rolled_back

    async def test_cancelled_and_never_started_stages_are_not_compensated(self) -> None:
        """A sibling cancelled by fail-fast and a stage that never started are not rolled back."""
        slow_started = anyio.Event()

        async def slow() -> None:
            slow_started.set()
            await anyio.sleep_forever()

        async def after_slow() -> None:
            await slow_started.wait()

        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_parallel_stages(saga.stage("slow", body=slow), saga.stage("bad", fail=True, body=after_slow))
            .add_stage(saga.stage("later"))
        )
        response = await pipeline.execute()
        assert saga.undone == ["a"]
        assert response.stages["slow"].status is pk.Status.CANCELLED
        assert response.stages["later"].status is pk.Status.SKIPPED
        assert response.stages["later"].attempts == 0


class TestRollbackTriggers:
    async def test_stage_timeout_triggers_rollback(self) -> None:
        """A stage exceeding its timeout fails the run as TIMED_OUT, and earlier stages are undone."""
        saga = Saga()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("slow", body=hang), timeout=0.05)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert saga.undone == ["a"]

    async def test_pipeline_timeout_triggers_rollback(self) -> None:
        """The whole run exceeding the pipeline timeout undoes the completed stages."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("slow", body=hang)).with_timeout(0.05)
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert saga.undone == ["a"]
        assert not response.stages["slow"].rolled_back

    async def test_request_timeout_triggers_rollback(self) -> None:
        """A request's own timeout also triggers rollback."""
        saga = Saga()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("slow", body=hang))
        request = pk.PipelineRequest(options=pk.RequestOptions(timeout=0.05))
        with anyio.fail_after(5):
            response = await pipeline.execute(request)
        assert response.status is pk.Status.TIMED_OUT
        assert saga.undone == ["a"]

    async def test_cancellation_triggers_rollback(self) -> None:
        """Cancelling the caller mid-stage undoes the completed stages before the cancellation propagates."""
        saga = Saga()
        entered = anyio.Event()

        async def block() -> None:
            entered.set()
            await anyio.sleep_forever()

        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("slow", body=block))
        returned: list[pk.PipelineResponse] = []
        async with anyio.create_task_group() as tg:

            async def runner() -> None:
                returned.append(await pipeline.execute())

            tg.start_soon(runner)
            await entered.wait()
            tg.cancel_scope.cancel()
        assert tg.cancel_scope.cancelled_caught
        assert returned == []
        assert saga.undone == ["a"]

    async def test_with_rollback_false_disables_compensation(self) -> None:
        """with_rollback(False): a failure leaves completed stages alone."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("boom", fail=True)).with_rollback(False)
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert saga.undo_log == []
        a = response.stages["a"]
        assert (a.status, a.rolled_back) == (pk.Status.SUCCEEDED, False)

    async def test_with_rollback_false_then_true_enables_it_again(self) -> None:
        """Builders return new values: re-enabling rollback works."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("boom", fail=True))
            .with_rollback(False)
            .with_rollback(True)
        )
        await pipeline.execute()
        assert saga.undone == ["a"]

    async def test_validation_failure_triggers_rollback(self) -> None:
        """A later stage rejected by its validate() fails the run, and earlier stages are undone."""

        def reject(ctx: pk.StageContext) -> None:
            raise pk.ValidationError("no")

        async def never(ctx: pk.StageContext) -> None:
            raise AssertionError("must not run")

        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_stage(pk.FunctionStage(name="checked", fn=never, validate_fn=reject))
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert saga.undone == ["a"]


class TestRollbackErrors:
    @staticmethod
    def pipeline(saga: Saga, error: Exception) -> pk.Pipeline:
        """Chain a -> b (rollback raises ``error``) -> c (fails)."""
        return (
            pk.Pipeline("p")
            .add_stage(saga.stage("a"))
            .add_stage(saga.stage("b", undo_error=error))
            .add_stage(saga.stage("c", fail=True))
        )

    async def test_original_failure_stays_the_error(self) -> None:
        """A rollback that raises does not replace the stage failure that caused it."""
        response = await self.pipeline(Saga(), UndoError("b")).execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "c"
        assert isinstance(response.error.__cause__, BoomError)
        with pytest.raises(pk.StageFailedError):
            response.raise_for_status()

    async def test_rollback_error_is_recorded_on_the_stage(self) -> None:
        """The stage whose rollback raised carries the error and is not marked rolled back."""
        error = UndoError("b")
        response = await self.pipeline(Saga(), error).execute()
        b = response.stages["b"]
        assert b.rollback_error is error
        assert not b.rolled_back
        assert b.status is not pk.Status.ROLLED_BACK

    async def test_rollback_error_is_attached_to_the_run_error(self) -> None:
        """response.error.rollback_error is a RollbackError (an ExceptionGroup) holding the rollback error."""
        error = UndoError("b")
        response = await self.pipeline(Saga(), error).execute()
        assert response.error is not None
        group = response.error.rollback_error
        assert isinstance(group, pk.RollbackError)
        assert isinstance(group, ExceptionGroup)
        assert isinstance(group, pk.PipekitError)
        assert list(group.exceptions) == [error]

    async def test_remaining_rollbacks_still_run(self) -> None:
        """The stage before the one whose rollback failed is still undone."""
        saga = Saga()
        response = await self.pipeline(saga, UndoError("b")).execute()
        assert saga.undone == ["a"]
        assert response.stages["a"].status is pk.Status.ROLLED_BACK

    async def test_every_rollback_error_is_collected(self) -> None:
        """Two failing rollbacks both end up in the group."""
        saga = Saga()
        first, second = UndoError("x"), UndoError("y")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("x", undo_error=first))
            .add_stage(saga.stage("y", undo_error=second))
            .add_stage(saga.stage("z"))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert response.error is not None
        assert response.error.rollback_error is not None
        assert set(response.error.rollback_error.exceptions) == {first, second}
        assert saga.undone == ["z"]

    async def test_no_rollback_error_when_rollbacks_succeed(self) -> None:
        """A clean compensation attaches no rollback error."""
        response = await pk.Pipeline("p").add_stage(Saga().stage("a")).add_stage(Saga().stage("b", fail=True)).execute()
        assert response.error is not None
        assert response.error.rollback_error is None

    async def test_rollback_error_attaches_to_a_pipeline_timeout(self) -> None:
        """On a whole-run timeout the error stays a PipelineTimeoutError, carrying the rollback error."""
        error = UndoError("a")
        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a", undo_error=error))
            .add_stage(saga.stage("slow", body=hang))
            .with_timeout(0.05)
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.error.rollback_error is not None
        assert list(response.error.rollback_error.exceptions) == [error]

    async def test_rollback_error_attaches_to_a_cancellation(self) -> None:
        """On cancellation the reported error stays a PipelineCancelledError, carrying the rollback error."""
        error = UndoError("a")
        entered = anyio.Event()
        finished: list[pk.PipelineFinished] = []

        async def block() -> None:
            entered.set()
            await anyio.sleep_forever()

        async def hook(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineFinished):
                finished.append(event)

        saga = Saga()
        pipeline = (
            pk.Pipeline("p").add_stage(saga.stage("a", undo_error=error)).add_stage(saga.stage("slow", body=block))
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(pipeline.execute, hooks=[hook]))
            await entered.wait()
            tg.cancel_scope.cancel()
        [event] = finished
        assert isinstance(event.error, pk.PipelineCancelledError)
        assert event.error.rollback_error is not None
        assert list(event.error.rollback_error.exceptions) == [error]

    async def test_rollback_timeout_bounds_a_hanging_rollback(self) -> None:
        """A rollback that hangs is cut off by the rollback timeout and recorded as a TimeoutError."""
        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("stuck", undo_body=hang), depends_on=())
            .add_stage(saga.stage("fine"), depends_on=())
            .add_stage(saga.stage("boom", fail=True), depends_on=("stuck", "fine"))
            .with_rollback(timeout=0.05)
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        stuck = response.stages["stuck"]
        assert isinstance(stuck.rollback_error, TimeoutError)
        assert not stuck.rolled_back
        assert saga.undone == ["fine"]
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.rollback_error is not None
        assert stuck.rollback_error in response.error.rollback_error.exceptions


class TestRollbackShield:
    async def test_rollback_finishes_when_the_caller_is_cancelled_during_it(self) -> None:
        """Cancelling the caller while a rollback runs does not interrupt that rollback."""
        in_rollback = anyio.Event()
        release = anyio.Event()

        async def wait_release() -> None:
            in_rollback.set()
            await release.wait()
            for _ in range(3):
                await anyio.lowlevel.checkpoint()

        saga = Saga()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("b", undo_body=wait_release))
        pipeline = pipeline.add_stage(saga.stage("boom", fail=True))
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
        assert saga.undone == ["b", "a"]

    async def test_rollback_after_cancellation_is_shielded(self) -> None:
        """Rollbacks that await run to completion even though the run itself was cancelled."""
        entered = anyio.Event()

        async def block() -> None:
            entered.set()
            await anyio.sleep_forever()

        async def awaits() -> None:
            for _ in range(5):
                await anyio.lowlevel.checkpoint()

        saga = Saga()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("a", undo_body=awaits))
            .add_stage(saga.stage("b", undo_body=awaits))
            .add_stage(saga.stage("slow", body=block))
        )
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipeline.execute)
                await entered.wait()
                scope.cancel()
        assert scope.cancelled_caught
        assert saga.undone == ["b", "a"]


class TestAtomicPipeline:
    async def test_failure_rolls_back_every_completed_stage(self) -> None:
        """Any failure undoes everything that completed, in reverse order."""
        saga = Saga()
        pipeline = (
            pk.AtomicPipeline("atomic")
            .add_stage(saga.stage("a"))
            .add_parallel_stages(saga.stage("b"), saga.stage("c"))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert sorted(saga.undone[:2]) == ["b", "c"]
        assert saga.undone[2:] == ["a"]

    async def test_failed_response_has_no_outputs(self) -> None:
        """A failed atomic run reports no partial outputs, neither overall nor per stage."""
        saga = Saga()
        pipeline = pk.AtomicPipeline("atomic").add_stage(saga.stage("a")).add_stage(saga.stage("boom", fail=True))
        response = await pipeline.execute()
        assert dict(response.outputs) == {}
        assert response.stages["a"].output is None

    async def test_successful_response_keeps_outputs(self) -> None:
        """A successful atomic run has every output and rolls nothing back."""
        saga = Saga()
        pipeline = pk.AtomicPipeline("atomic").add_stage(saga.stage("a")).add_stage(saga.stage("b"))
        response = await pipeline.execute()
        assert dict(response.outputs) == {"a": "a-out", "b": "b-out"}
        assert saga.undo_log == []

    async def test_plain_pipeline_keeps_partial_outputs(self) -> None:
        """Contrast: a plain pipeline's failed response keeps the completed stages' outputs."""
        saga = Saga()
        pipeline = pk.Pipeline("plain").add_stage(saga.stage("a")).add_stage(saga.stage("boom", fail=True))
        response = await pipeline.execute()
        assert dict(response.outputs) == {"a": "a-out"}

    async def test_rollback_cannot_be_disabled(self) -> None:
        """with_rollback(False) on an atomic pipeline is a definition error."""
        with pytest.raises(pk.PipelineDefinitionError):
            pk.AtomicPipeline("atomic").with_rollback(False)

    async def test_tolerated_failure_still_means_nothing(self) -> None:
        """All or nothing: a failed continue_on_error stage is either refused or rolls everything back."""
        saga = Saga()
        try:
            pipeline = (
                pk.AtomicPipeline("atomic")
                .add_stage(saga.stage("a"))
                .add_stage(saga.stage("soft", fail=True), continue_on_error=True)
                .add_stage(saga.stage("c"), depends_on=("a",))
            )
        except pk.PipelineDefinitionError:
            return  # refusing the combination honours all-or-nothing too
        response = await pipeline.execute()
        assert not response.ok
        assert sorted(saga.undone) == ["a", "c"]
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

    async def test_serialised_runs_include_rollback(self) -> None:
        """The second run starts only after the first one's rollback finished."""
        log: list[str] = []

        async def work(ctx: pk.StageContext) -> None:
            log.append(f"start {ctx.request.type}")
            await anyio.lowlevel.checkpoint()

        async def undo(ctx: pk.StageContext) -> None:
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            log.append(f"undone {ctx.request.type}")

        async def boom(ctx: pk.StageContext) -> None:
            raise BoomError(ctx.request.type)

        pipeline = (
            pk.AtomicPipeline("atomic")
            .add_stage(pk.FunctionStage(name="work", fn=work, rollback_fn=undo))
            .add_stage(pk.FunctionStage(name="boom", fn=boom))
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.execute, pk.PipelineRequest(type="1"))
            tg.start_soon(pipeline.execute, pk.PipelineRequest(type="2"))
        first = log[0].split()[1]
        second = "2" if first == "1" else "1"
        assert log == [f"start {first}", f"undone {first}", f"start {second}", f"undone {second}"]


class TestNestedRollback:
    async def test_succeeded_inner_pipeline_is_compensated_by_a_later_failure(self) -> None:
        """Chain a -> inner(x -> y) -> b -> boom: undone b, y, x, a."""
        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).add_stage(saga.stage("y"))
        outer = (
            pk.Pipeline("outer")
            .add_stage(saga.stage("a"))
            .add_stage(inner)
            .add_stage(saga.stage("b"))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await outer.execute()
        assert saga.undone == ["b", "y", "x", "a"]
        result = response.stages["inner"]
        assert (result.status, result.rolled_back) == (pk.Status.ROLLED_BACK, True)

    async def test_inner_failure_compensates_the_inner_stages_once(self) -> None:
        """An inner failure undoes the inner stages, then the outer run undoes its own; each once."""
        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).add_stage(saga.stage("y"))
        inner = inner.add_stage(saga.stage("z", fail=True))
        outer = pk.Pipeline("outer").add_stage(saga.stage("a")).add_stage(inner)
        response = await outer.execute()
        assert saga.undone == ["y", "x", "a"]
        assert response.status is pk.Status.FAILED
        result = response.stages["inner"]
        assert (result.status, result.rolled_back) == (pk.Status.FAILED, False)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "inner"

    async def test_inner_pipeline_cancelled_by_a_sibling_compensates_itself(self) -> None:
        """An inner pipeline cancelled by fail-fast undoes the inner stages that completed, once."""
        x_done = anyio.Event()

        async def signal() -> None:
            x_done.set()

        async def after_x() -> None:
            await x_done.wait()

        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x", body=signal)).add_stage(saga.stage("stuck", body=hang))
        outer = (
            pk.Pipeline("outer")
            .add_stage(saga.stage("a"))
            .add_parallel_stages(inner, saga.stage("bad", fail=True, body=after_x))
        )
        response = await outer.execute()
        assert saga.undone == ["x", "a"]
        assert response.stages["inner"].status is pk.Status.CANCELLED

    async def test_inner_pipeline_timing_out_compensates_itself(self) -> None:
        """An inner pipeline cut off by its stage timeout undoes its completed stages, then the outer ones."""
        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).add_stage(saga.stage("stuck", body=hang))
        outer = pk.Pipeline("outer").add_stage(saga.stage("a")).add_stage(inner, timeout=0.05)
        with anyio.fail_after(5):
            response = await outer.execute()
        assert saga.undone == ["x", "a"]
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["inner"].status is pk.Status.TIMED_OUT

    async def test_inner_pipeline_in_a_timed_out_run_compensates_itself(self) -> None:
        """When the outer run times out inside an inner pipeline, inner then outer stages are undone."""
        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).add_stage(saga.stage("stuck", body=hang))
        outer = pk.Pipeline("outer").add_stage(saga.stage("a")).add_stage(inner).with_timeout(0.05)
        with anyio.fail_after(5):
            response = await outer.execute()
        assert saga.undone == ["x", "a"]
        assert response.status is pk.Status.TIMED_OUT

    async def test_retried_inner_pipeline_compensates_each_attempt_once(self) -> None:
        """A failed first attempt undoes itself; the successful second one is undone by the later failure."""
        saga = Saga()
        failed_once: list[str] = []

        async def fail_once() -> None:
            if not failed_once:
                failed_once.append("y")
                raise BoomError("first attempt")

        async def no_sleep(seconds: float) -> None:
            pass

        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).add_stage(saga.stage("y", body=fail_once))
        outer = (
            pk.Pipeline("outer")
            .add_stage(saga.stage("a"))
            .add_stage(inner, retry=pk.RetryPolicy(max_attempts=2, sleep=no_sleep))
            .add_stage(saga.stage("boom", fail=True))
        )
        response = await outer.execute()
        assert saga.executed == ["a", "x", "x", "y"]
        assert saga.undone == ["x", "y", "x", "a"]
        assert response.stages["inner"].attempts == 2
        assert response.stages["inner"].status is pk.Status.ROLLED_BACK

    async def test_inner_pipeline_without_rollback_is_not_compensated(self) -> None:
        """An inner pipeline built with_rollback(False) is left alone by the outer compensation."""
        saga = Saga()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x")).with_rollback(False)
        outer = (
            pk.Pipeline("outer").add_stage(saga.stage("a")).add_stage(inner).add_stage(saga.stage("boom", fail=True))
        )
        response = await outer.execute()
        assert saga.undone == ["a"]
        assert response.stages["inner"].status is pk.Status.SUCCEEDED

    async def test_inner_rollback_error_is_reported_on_the_inner_stage(self) -> None:
        """An inner rollback failure surfaces as a RollbackError on the outer stage result."""
        saga = Saga()
        error = UndoError("x")
        inner = pk.Pipeline("inner").add_stage(saga.stage("x", undo_error=error)).add_stage(saga.stage("y"))
        outer = (
            pk.Pipeline("outer").add_stage(saga.stage("a")).add_stage(inner).add_stage(saga.stage("boom", fail=True))
        )
        response = await outer.execute()
        result = response.stages["inner"]
        assert isinstance(result.rollback_error, pk.RollbackError)
        assert list(result.rollback_error.exceptions) == [error]
        assert saga.undone == ["y", "a"]
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "boom"


class TestRollbackEvents:
    async def test_rollback_events_in_order(self) -> None:
        """RollbackStarted, then one StageRolledBack per stage, then RollbackFinished, then PipelineFinished."""
        saga = Saga()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("b"))
        pipeline = pipeline.add_stage(saga.stage("boom", fail=True))
        request = pk.PipelineRequest()
        await pipeline.execute(request, hooks=[hook])
        [started] = hook.of(pk.RollbackStarted)
        assert set(started.stages) == {"a", "b"}
        assert [e.stage for e in hook.of(pk.StageRolledBack)] == ["b", "a"]
        [finished] = hook.of(pk.RollbackFinished)
        assert (finished.rolled_back, finished.failed) == (2, 0)
        assert (
            hook.position(pk.StageFailed, "boom")
            < hook.position(pk.RollbackStarted)
            < hook.position(pk.StageRolledBack, "b")
            < hook.position(pk.StageRolledBack, "a")
            < hook.position(pk.RollbackFinished)
            < hook.position(pk.PipelineFinished)
        )
        rollback_events = [*hook.of(pk.RollbackStarted), *hook.of(pk.StageRolledBack), *hook.of(pk.RollbackFinished)]
        assert {(e.request_id, e.pipeline) for e in rollback_events} == {(request.id, "p")}

    async def test_failed_rollback_emits_stage_rollback_failed(self) -> None:
        """A rollback that raises emits StageRollbackFailed with the error, counted in RollbackFinished."""
        error = UndoError("a")
        saga = Saga()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a", undo_error=error)).add_stage(saga.stage("b"))
        pipeline = pipeline.add_stage(saga.stage("boom", fail=True))
        await pipeline.execute(hooks=[hook])
        [failed] = hook.of(pk.StageRollbackFailed)
        assert (failed.stage, failed.error) == ("a", error)
        assert [e.stage for e in hook.of(pk.StageRolledBack)] == ["b"]
        [finished] = hook.of(pk.RollbackFinished)
        assert (finished.rolled_back, finished.failed) == (1, 1)

    async def test_rollback_timeout_emits_stage_rollback_failed(self) -> None:
        """A rollback cut off by the rollback timeout emits StageRollbackFailed with a TimeoutError."""
        saga = Saga()
        hook = Recorder()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(saga.stage("stuck", undo_body=hang))
            .add_stage(saga.stage("boom", fail=True))
            .with_rollback(timeout=0.05)
        )
        with anyio.fail_after(5):
            await pipeline.execute(hooks=[hook])
        [failed] = hook.of(pk.StageRollbackFailed)
        assert failed.stage == "stuck"
        assert isinstance(failed.error, TimeoutError)

    async def test_no_rollback_events_on_success(self) -> None:
        """A successful run emits no rollback events."""
        hook = Recorder()
        await pk.Pipeline("p").add_stage(Saga().stage("a")).execute(hooks=[hook])
        assert [e for e in hook.events if "rollback" in e.kind or "rolled" in e.kind] == []
        assert hook.of(pk.PipelineFinished)[0].status is pk.Status.SUCCEEDED

    async def test_no_rollback_events_without_anything_to_undo(self) -> None:
        """A failure with nothing compensable emits no rollback events."""
        saga = Saga()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a", rollback=False)).add_stage(saga.stage("b", fail=True))
        await pipeline.execute(hooks=[hook])
        assert hook.of(pk.RollbackStarted) == []
        assert hook.of(pk.RollbackFinished) == []

    async def test_pipeline_hooks_also_see_rollback_events(self) -> None:
        """Hooks attached to the pipeline with with_hooks receive the rollback events too."""
        saga = Saga()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(saga.stage("a")).add_stage(saga.stage("boom", fail=True))
        await pipeline.with_hooks(hook).execute()
        assert [e.stage for e in hook.of(pk.StageRolledBack)] == ["a"]

    async def test_nested_rollback_events_name_the_inner_pipeline(self) -> None:
        """Compensating an inner pipeline emits its stages' StageRolledBack under the inner pipeline's name."""
        saga = Saga()
        hook = Recorder()
        inner = pk.Pipeline("inner").add_stage(saga.stage("x"))
        outer = pk.Pipeline("outer").add_stage(inner).add_stage(saga.stage("boom", fail=True))
        await outer.execute(hooks=[hook])
        rolled = {(e.pipeline, e.stage) for e in hook.of(pk.StageRolledBack)}
        assert rolled == {("inner", "x"), ("outer", "inner")}


class TestRollbackTimeoutErrors:
    """Rollbacks that run out of time say whether they hung or never started."""

    async def test_hung_and_waiting_rollbacks(self) -> None:
        """The hung rollback 'did not finish'; the one waiting behind it 'did not start', naming it."""
        log: list[str] = []

        async def undo_a(ctx: pk.StageContext) -> None:
            log.append("undo a")

        async def undo_b(ctx: pk.StageContext) -> None:
            await anyio.sleep_forever()

        @pk.stage(rollback=undo_a)
        async def a(ctx: pk.StageContext) -> None: ...

        @pk.stage(rollback=undo_b)
        async def b(ctx: pk.StageContext) -> None: ...

        @pk.stage
        async def c(ctx: pk.StageContext) -> None:
            raise BoomError("c broke")

        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b).add_stage(c).with_rollback(timeout=0.05)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        b_error = response.stages["b"].rollback_error
        a_error = response.stages["a"].rollback_error
        assert isinstance(b_error, pk.RollbackTimeoutError)
        assert "did not finish within the 0.05s rollback timeout" in str(b_error)
        assert isinstance(a_error, pk.RollbackTimeoutError)
        assert a_error.waiting_for == ("b",)
        assert "did not start" in str(a_error)
        assert log == []
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.rollback_error is not None
        assert set(response.error.rollback_error.exceptions) == {a_error, b_error}

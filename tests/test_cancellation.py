"""Cancellation: a running execution cancelled mid-stage or mid-back-off, and fail-fast cancelling siblings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import anyio.lowlevel

import pipekit as pk

E = TypeVar("E", bound=pk.Event)

Body = Callable[[], Awaitable[None]]


class BoomError(Exception):
    """The failure a test stage raises."""


class Recorder:
    """An async hook collecting every event of a run."""

    def __init__(self) -> None:
        self.events: list[pk.Event] = []

    async def __call__(self, event: pk.Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        """The recorded events of one kind, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def finished(self, pipeline: str) -> pk.PipelineFinished:
        """The PipelineFinished event of ``pipeline``."""
        [event] = [e for e in self.of(pk.PipelineFinished) if e.pipeline == pipeline]
        return event


class Tracker:
    """Builds stages that record starts, completions, interruptions and rollbacks."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.completed: list[str] = []
        self.interrupted: list[str] = []
        self.undone: list[str] = []

    def stage(
        self,
        name: str,
        *,
        body: Body | None = None,
        fail: bool = False,
        undo_body: Body | None = None,
        rollback: bool = True,
    ) -> pk.FunctionStage:
        """A stage running ``body`` (then raising :class:`BoomError` if ``fail``), with a logging rollback."""

        async def execute(ctx: pk.StageContext) -> str:
            self.started.append(name)
            try:
                await anyio.lowlevel.checkpoint()
                if body is not None:
                    await body()
            except anyio.get_cancelled_exc_class():
                self.interrupted.append(name)
                raise
            if fail:
                raise BoomError(name)
            self.completed.append(name)
            return name

        async def undo(ctx: pk.StageContext) -> None:
            if undo_body is not None:
                await undo_body()
            self.undone.append(name)

        return pk.FunctionStage(name=name, fn=execute, rollback_fn=undo if rollback else None)


def blocker(entered: anyio.Event) -> Body:
    """A body that signals ``entered`` and then waits forever."""

    async def body() -> None:
        entered.set()
        await anyio.sleep_forever()

    return body


def waits_for(event: anyio.Event) -> Body:
    """A body that waits for ``event``."""

    async def body() -> None:
        await event.wait()

    return body


class Outcome:
    """What the caller of a cancelled execution saw."""

    def __init__(self) -> None:
        self.cancelled_caught = False
        self.returned = False


async def cancel_when(
    pipeline: pk.Pipeline,
    ready: anyio.Event,
    hooks: Sequence[pk.Hook] = (),
    request: pk.PipelineRequest | None = None,
) -> Outcome:
    """Run ``pipeline`` in a task, cancel the enclosing scope once ``ready`` is set.

    A run that returns instead sets ``ready`` itself, so a test whose run never
    reaches the expected point fails at once rather than at the guard.
    """
    outcome = Outcome()

    async def run() -> None:
        await pipeline.execute(request, hooks=hooks)
        outcome.returned = True
        ready.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await ready.wait()
            tg.cancel_scope.cancel()
    outcome.cancelled_caught = tg.cancel_scope.cancelled_caught
    return outcome


class TestCancelMidStage:
    async def test_cancellation_propagates_to_the_caller(self) -> None:
        """execute() does not return: the cancellation reaches the caller's scope."""
        entered = anyio.Event()
        t = Tracker()
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(t.stage("slow", body=blocker(entered)))
        outcome = await cancel_when(pipeline, entered)
        assert outcome.cancelled_caught
        assert not outcome.returned

    async def test_in_flight_stage_is_interrupted(self) -> None:
        """The stage inside execute sees the cancellation, and is recorded CANCELLED."""
        entered = anyio.Event()
        t = Tracker()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(t.stage("slow", body=blocker(entered)))
        await cancel_when(pipeline, entered, hooks=[hook])
        assert t.interrupted == ["slow"]
        assert "slow" not in t.completed
        [cancelled] = hook.of(pk.StageCancelled)
        assert (cancelled.stage, cancelled.status) == ("slow", pk.Status.CANCELLED)

    async def test_completed_stages_are_rolled_back(self) -> None:
        """The stages that completed before the cancellation are undone, last first."""
        entered = anyio.Event()
        t = Tracker()
        hook = Recorder()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a"))
            .add_stage(t.stage("b"))
            .add_stage(t.stage("slow", body=blocker(entered)))
        )
        await cancel_when(pipeline, entered, hooks=[hook])
        assert t.undone == ["b", "a"]
        assert "slow" not in t.undone
        assert [e.stage for e in hook.of(pk.StageRolledBack)] == ["b", "a"]

    async def test_run_reports_cancelled(self) -> None:
        """The run finishes CANCELLED with a PipelineCancelledError naming the pipeline and request."""
        entered = anyio.Event()
        t = Tracker()
        hook = Recorder()
        request = pk.PipelineRequest()
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(t.stage("slow", body=blocker(entered)))
        await cancel_when(pipeline, entered, hooks=[hook], request=request)
        finished = hook.finished("p")
        assert finished.status is pk.Status.CANCELLED
        assert isinstance(finished.error, pk.PipelineCancelledError)
        assert (finished.error.pipeline, finished.error.request_id) == ("p", request.id)

    async def test_later_stages_never_start(self) -> None:
        """Stages after the interrupted one do not run and are recorded skipped."""
        entered = anyio.Event()
        t = Tracker()
        hook = Recorder()
        pipeline = pk.Pipeline("p").add_stage(t.stage("slow", body=blocker(entered))).add_stage(t.stage("later"))
        await cancel_when(pipeline, entered, hooks=[hook])
        assert "later" not in t.started
        assert [e.stage for e in hook.of(pk.StageSkipped)] == ["later"]
        assert t.undone == []

    async def test_every_in_flight_parallel_stage_is_interrupted(self) -> None:
        """Cancelling while two parallel stages run interrupts both; neither is rolled back."""
        one, two = anyio.Event(), anyio.Event()
        both = anyio.Event()

        async def first() -> None:
            one.set()
            if two.is_set():
                both.set()
            await anyio.sleep_forever()

        async def second() -> None:
            two.set()
            if one.is_set():
                both.set()
            await anyio.sleep_forever()

        t = Tracker()
        hook = Recorder()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a"))
            .add_parallel_stages(t.stage("p1", body=first), t.stage("p2", body=second))
        )
        await cancel_when(pipeline, both, hooks=[hook])
        assert sorted(t.interrupted) == ["p1", "p2"]
        assert t.undone == ["a"]
        assert {(e.stage, e.status) for e in hook.of(pk.StageCancelled)} == {
            ("p1", pk.Status.CANCELLED),
            ("p2", pk.Status.CANCELLED),
        }

    async def test_rollback_runs_shielded_and_may_wait(self) -> None:
        """A rollback that awaits something set from outside the cancelled scope still completes."""
        entered = anyio.Event()
        in_rollback = anyio.Event()
        release = anyio.Event()

        async def undo_body() -> None:
            in_rollback.set()
            await release.wait()

        t = Tracker()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a", undo_body=undo_body))
            .add_stage(t.stage("slow", body=blocker(entered)))
        )
        scope = anyio.CancelScope()

        async def caller() -> None:
            with scope:
                await pipeline.execute()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await entered.wait()
                scope.cancel()
                await in_rollback.wait()
                await anyio.wait_all_tasks_blocked()
                assert t.undone == []
                release.set()
        assert scope.cancelled_caught
        assert t.undone == ["a"]

    async def test_rollback_disabled_still_propagates(self) -> None:
        """With rollback off, a cancelled run undoes nothing and still propagates the cancellation."""
        entered = anyio.Event()
        t = Tracker()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a"))
            .add_stage(t.stage("slow", body=blocker(entered)))
            .with_rollback(False)
        )
        outcome = await cancel_when(pipeline, entered)
        assert outcome.cancelled_caught
        assert t.undone == []
        assert t.interrupted == ["slow"]

    async def test_caller_timeout_cancels_and_rolls_back(self) -> None:
        """A caller's move_on_after around execute is a cancellation: stage interrupted, rollback done."""
        t = Tracker()
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(t.stage("slow", body=anyio.sleep_forever))
        with anyio.move_on_after(0.05) as scope:
            await pipeline.execute()
        assert scope.cancelled_caught
        assert t.interrupted == ["slow"]
        assert t.undone == ["a"]

    async def test_already_cancelled_caller_runs_nothing_to_completion(self) -> None:
        """Executing inside an already-cancelled scope completes no stage and compensates none."""
        t = Tracker()
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(t.stage("b"))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pipeline.execute()
        assert scope.cancelled_caught
        assert t.completed == []
        assert t.undone == []

    async def test_nested_pipeline_is_interrupted_and_compensated(self) -> None:
        """Cancelling mid-stage inside an inner pipeline undoes the inner stages, then the outer ones."""
        entered = anyio.Event()
        t = Tracker()
        hook = Recorder()
        inner = pk.Pipeline("inner").add_stage(t.stage("x")).add_stage(t.stage("slow", body=blocker(entered)))
        outer = pk.Pipeline("outer").add_stage(t.stage("a")).add_stage(inner).add_stage(t.stage("after"))
        outcome = await cancel_when(outer, entered, hooks=[hook])
        assert outcome.cancelled_caught
        assert t.interrupted == ["slow"]
        assert t.undone == ["x", "a"]
        assert "after" not in t.started
        assert {(e.pipeline, e.stage) for e in hook.of(pk.StageCancelled)} == {("inner", "slow"), ("outer", "inner")}
        assert hook.finished("outer").status is pk.Status.CANCELLED


class TestCancelDuringBackoff:
    @staticmethod
    def flaky(t: Tracker, attempts: list[int]) -> pk.FunctionStage:
        """A stage that always fails, counting its attempts."""

        async def execute(ctx: pk.StageContext) -> None:
            attempts.append(ctx.attempt)
            raise BoomError("flaky")

        async def undo(ctx: pk.StageContext) -> None:
            t.undone.append("flaky")

        return pk.FunctionStage(name="flaky", fn=execute, rollback_fn=undo)

    async def test_cancel_during_backoff_sleep(self) -> None:
        """Cancelling while a retry waits out its back-off stops the retrying and rolls back."""
        sleeping = anyio.Event()
        delays: list[float] = []
        interrupted: list[float] = []

        async def fake_sleep(seconds: float) -> None:
            delays.append(seconds)
            sleeping.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                interrupted.append(seconds)
                raise

        t = Tracker()
        attempts: list[int] = []
        hook = Recorder()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a"))
            .add_stage(self.flaky(t, attempts), retry=pk.RetryPolicy(max_attempts=5, jitter=0, sleep=fake_sleep))
        )
        outcome = await cancel_when(pipeline, sleeping, hooks=[hook])
        assert outcome.cancelled_caught
        assert attempts == [1]
        assert delays == [1.0]
        assert interrupted == [1.0]
        assert t.undone == ["a"]
        assert len(hook.of(pk.StageRetrying)) == 1
        [cancelled] = hook.of(pk.StageCancelled)
        assert (cancelled.stage, cancelled.status) == ("flaky", pk.Status.CANCELLED)

    async def test_custom_backoff_delay_is_cancellable(self) -> None:
        """Cancelling during a configured 30 s back-off: the sleep asked for 30 s and was interrupted."""
        sleeping = anyio.Event()
        delays: list[float] = []

        async def fake_sleep(seconds: float) -> None:
            delays.append(seconds)
            sleeping.set()
            await anyio.sleep_forever()

        t = Tracker()
        attempts: list[int] = []
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=30, max_delay=60, jitter=0, sleep=fake_sleep)
        pipeline = pk.Pipeline("p").add_stage(t.stage("a")).add_stage(self.flaky(t, attempts), retry=policy)
        outcome = await cancel_when(pipeline, sleeping)
        assert delays == [30.0]
        assert outcome.cancelled_caught
        assert attempts == [1]
        assert t.undone == ["a"]

    async def test_default_backoff_sleep_is_cancellable(self) -> None:
        """With the default anyio.sleep, a back-off is interrupted at once by cancellation."""
        retrying = anyio.Event()

        async def on_event(event: pk.Event) -> None:
            if isinstance(event, pk.StageRetrying):
                retrying.set()

        t = Tracker()
        attempts: list[int] = []
        pipeline = pk.Pipeline("p").add_stage(self.flaky(t, attempts), retry=pk.RetryPolicy(max_attempts=3, jitter=0))
        start = anyio.current_time()
        outcome = await cancel_when(pipeline, retrying, hooks=[on_event])
        assert anyio.current_time() - start < 0.5
        assert outcome.cancelled_caught
        assert attempts == [1]

    async def test_fail_fast_interrupts_a_siblings_backoff(self) -> None:
        """A sibling's hard failure cancels a stage waiting out its back-off; it is recorded CANCELLED."""
        sleeping = anyio.Event()

        async def fake_sleep(seconds: float) -> None:
            sleeping.set()
            await anyio.sleep_forever()

        t = Tracker()
        attempts: list[int] = []
        pipeline = (
            pk.Pipeline("p")
            .add_stage(self.flaky(t, attempts), depends_on=(), retry=pk.RetryPolicy(max_attempts=5, sleep=fake_sleep))
            .add_stage(t.stage("bad", body=waits_for(sleeping), fail=True), depends_on=())
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert attempts == [1]
        assert response.stages["flaky"].status is pk.Status.CANCELLED
        assert response.stages["bad"].status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "bad"


class TestFailFast:
    @staticmethod
    def group(t: Tracker) -> pk.Pipeline:
        """a, then [slow1, slow2, bad]; bad fails once both slow stages are running."""
        s1, s2 = anyio.Event(), anyio.Event()

        async def after_both() -> None:
            await s1.wait()
            await s2.wait()

        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("a"))
            .add_parallel_stages(
                t.stage("slow1", body=blocker(s1)),
                t.stage("slow2", body=blocker(s2)),
            )
        )
        bad = t.stage("bad", body=after_both, fail=True)
        return pipeline.add_stage(bad, depends_on=("a",))

    async def test_in_flight_siblings_are_cancelled(self) -> None:
        """A failing stage interrupts the stages running beside it; they end CANCELLED."""
        t = Tracker()
        pipeline = self.group(t)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert sorted(t.interrupted) == ["slow1", "slow2"]
        for name in ("slow1", "slow2"):
            result = response.stages[name]
            assert result.status is pk.Status.CANCELLED
            assert not result.rolled_back
            assert result.reason is not None
            assert "bad" in result.reason

    async def test_run_reports_the_failure_not_a_cancellation(self) -> None:
        """The run's error is the failing stage's, and the run is FAILED, not CANCELLED."""
        t = Tracker()
        pipeline = self.group(t)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "bad"
        assert isinstance(response.error.__cause__, BoomError)
        assert response.stages["bad"].status is pk.Status.FAILED

    async def test_completed_stages_are_rolled_back_after_fail_fast(self) -> None:
        """After cancelling siblings, only the stage that completed is undone."""
        t = Tracker()
        pipeline = self.group(t)
        with anyio.fail_after(5):
            await pipeline.execute()
        assert t.undone == ["a"]

    async def test_siblings_emit_stage_cancelled(self) -> None:
        """Each interrupted sibling emits StageCancelled with status CANCELLED."""
        t = Tracker()
        hook = Recorder()
        pipeline = self.group(t)
        with anyio.fail_after(5):
            await pipeline.execute(hooks=[hook])
        assert {(e.stage, e.status) for e in hook.of(pk.StageCancelled)} == {
            ("slow1", pk.Status.CANCELLED),
            ("slow2", pk.Status.CANCELLED),
        }

    async def test_tolerated_failure_cancels_nothing(self) -> None:
        """A continue_on_error failure lets the stages beside it finish."""
        failed = anyio.Event()

        async def fail_and_signal() -> None:
            failed.set()
            raise BoomError("soft")

        t = Tracker()
        pipeline = pk.Pipeline("p").add_parallel_stages(
            t.stage("soft", body=fail_and_signal), t.stage("sibling", body=waits_for(failed)), continue_on_error=True
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert t.interrupted == []
        assert response.stages["sibling"].status is pk.Status.SUCCEEDED
        assert response.stages["soft"].status is pk.Status.FAILED

    async def test_stage_timeout_cancels_siblings(self) -> None:
        """A stage timing out is a failure too: its running sibling is cancelled."""
        entered = anyio.Event()
        t = Tracker()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(t.stage("sibling", body=blocker(entered)), depends_on=())
            .add_stage(t.stage("slow", body=anyio.sleep_forever), depends_on=(), timeout=0.05)
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert response.stages["sibling"].status is pk.Status.CANCELLED

    async def test_failure_cancels_other_branches_of_a_graph(self) -> None:
        """A failure in one branch cancels a running stage in an independent branch; its dependents never start."""
        entered = anyio.Event()
        t = Tracker()
        pipeline = (
            pk.Pipeline("graph")
            .add_stage(t.stage("left", body=blocker(entered)), depends_on=())
            .add_stage(t.stage("left_next"), depends_on=("left",))
            .add_stage(t.stage("right", body=waits_for(entered), fail=True), depends_on=())
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert t.interrupted == ["left"]
        assert response.stages["left"].status is pk.Status.CANCELLED
        assert response.stages["left_next"].status is pk.Status.SKIPPED
        assert "left_next" not in t.started

    async def test_cancelled_nested_sibling_compensates_itself(self) -> None:
        """An inner pipeline cancelled by fail-fast undoes its completed stages once, before the outer ones."""
        entered = anyio.Event()
        t = Tracker()
        inner = pk.Pipeline("inner").add_stage(t.stage("x")).add_stage(t.stage("stuck", body=blocker(entered)))
        outer = (
            pk.Pipeline("outer")
            .add_stage(t.stage("a"))
            .add_parallel_stages(inner, t.stage("bad", body=waits_for(entered), fail=True))
        )
        with anyio.fail_after(5):
            response = await outer.execute()
        assert t.undone == ["x", "a"]
        assert t.interrupted == ["stuck"]
        assert response.stages["inner"].status is pk.Status.CANCELLED


class TestErrorsRaisedWhileInterrupted:
    """A stage whose cleanup raises while it is being interrupted was interrupted, not failed."""

    @staticmethod
    def cleanup_fails(entered: anyio.Event | None = None) -> pk.FunctionStage:
        async def upload(ctx: pk.StageContext) -> None:
            try:
                if entered is not None:
                    entered.set()
                await anyio.sleep_forever()
            finally:
                raise ConnectionResetError("connection dropped during cleanup")

        return pk.stage(name="upload")(upload)

    async def test_stage_timeout(self) -> None:
        """The stage's own timeout wins: TIMED_OUT, with the cleanup error as the cause."""
        response = await pk.Pipeline("p").add_stage(self.cleanup_fails(), timeout=0.02).execute()
        assert response.status is pk.Status.TIMED_OUT
        error = response.stages["upload"].error
        assert isinstance(error, pk.StageTimeoutError)
        assert isinstance(error.__cause__, ConnectionResetError)

    async def test_run_timeout(self) -> None:
        """The run's deadline wins: TIMED_OUT with PipelineTimeoutError; the cleanup error is kept on the stage."""
        response = await pk.Pipeline("p").add_stage(self.cleanup_fails()).with_timeout(0.02).execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.stages["upload"].status is pk.Status.TIMED_OUT
        assert isinstance(response.stages["upload"].error, ConnectionResetError)

    async def test_fail_fast_sibling(self) -> None:
        """A sibling interrupted by fail-fast is CANCELLED even though its cleanup raised."""
        entered = anyio.Event()

        @pk.stage
        async def breaks(ctx: pk.StageContext) -> None:
            await entered.wait()
            raise BoomError("the real failure")

        response = await pk.Pipeline("p").add_parallel_stages(self.cleanup_fails(entered), breaks).execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "breaks"
        assert response.stages["upload"].status is pk.Status.CANCELLED

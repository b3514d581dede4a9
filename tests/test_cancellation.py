"""Cancellation: a running execution cancelled mid-stage or mid-back-off, and fail-fast cancelling siblings.

The stages are `pipekit.testing.MockStage`s (see `Probe`), and every test runs on the fake clock
(asyncio and trio): a stage with a ``HOUR`` delay is in flight until something cancels it,
back-off and timeouts take no real time, and the tests can say exactly when the run ended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pipekit as pk
from pipekit.testing import EventCapture, FakeClock, MockStage, assert_rolled_back, assert_status
from tests.helpers import Body, YieldingMock

pytestmark = pytest.mark.pipekit_clock


HOUR = 3600.0
"""Longer than any test waits: a stage taking this long is in flight until something cancels it.

(Unlike ``sleep_forever`` it is a timer, so a broken timeout or cancellation makes the test fail, not hang.)"""


class BoomError(Exception):
    """The failure a test stage raises."""


class Probe(YieldingMock):
    """A `YieldingMock` that also counts how its calls ended: completed, or interrupted by a cancellation."""

    def __init__(self, name: str, *, undo: Body | None = None, **kwargs: Any) -> None:
        super().__init__(name, undo=undo, **kwargs)
        self.completed = 0
        self.interrupted = 0

    async def execute(self, ctx: pk.StageContext) -> Any:
        try:
            output = await super().execute(ctx)
        except anyio.get_cancelled_exc_class():
            self.interrupted += 1
            raise
        self.completed += 1
        return output


def probes(pipeline: pk.Pipeline) -> Iterator[Probe]:
    """The probe stages of ``pipeline``, those of nested pipelines included, in definition order."""
    for entry in pipeline.entries:
        if isinstance(entry.stage, Probe):
            yield entry.stage
        elif isinstance(entry.stage, pk.Pipeline):
            yield from probes(entry.stage)


def interrupted(pipeline: pk.Pipeline) -> list[str]:
    """The stages of ``pipeline`` whose execute saw a cancellation."""
    return [p.name for p in probes(pipeline) if p.interrupted]


def completed(pipeline: pk.Pipeline) -> list[str]:
    """The stages of ``pipeline`` whose execute returned."""
    return [p.name for p in probes(pipeline) if p.completed]


def rollback_calls(pipeline: pk.Pipeline) -> dict[str, int]:
    """How often each stage of ``pipeline`` had its rollback called, if at all."""
    return {p.name: len(p.rollbacks) for p in probes(pipeline) if p.rollbacks}


def undone(events: EventCapture) -> list[tuple[str, str | None]]:
    """(pipeline, stage) of every StageRolledBack event, in order: the order across nested runs too."""
    return [(e.pipeline, e.stage) for e in events.of(pk.StageRolledBack)]


def finished(events: EventCapture, pipeline: str) -> pk.PipelineFinished:
    """The PipelineFinished event of ``pipeline``."""
    [event] = [e for e in events.of(pk.PipelineFinished) if e.pipeline == pipeline]
    return event


def after(seconds: float) -> Body:
    """Waits ``seconds`` (virtual) seconds."""
    return partial(anyio.sleep, seconds)


class Outcome:
    """What the caller of a cancelled execution saw."""

    def __init__(self) -> None:
        self.cancelled_caught = False
        self.returned = False


async def cancel_when(
    pipeline: pk.Pipeline,
    ready: Body,
    hooks: Sequence[pk.Hook] = (),
    request: pk.PipelineRequest | None = None,
) -> Outcome:
    """Run ``pipeline`` in a task, and cancel the enclosing scope once ``ready()`` returns.

    A run that returns first stops the waiting, so a test whose run never reaches the expected
    point fails at once rather than at the guard.
    """
    outcome = Outcome()
    waiting = anyio.CancelScope()

    async def run() -> None:
        await pipeline.execute(request, hooks=hooks)
        outcome.returned = True
        waiting.cancel()

    with anyio.fail_after(10 * HOUR):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with waiting:
                await ready()
            tg.cancel_scope.cancel()
    outcome.cancelled_caught = tg.cancel_scope.cancelled_caught
    return outcome


class TestCancelMidStage:
    async def test_cancellation_propagates_to_the_caller(self, pipekit_clock: FakeClock) -> None:
        """execute() does not return: the cancellation reaches the caller's scope."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("slow", delay=HOUR))
        outcome = await cancel_when(pipeline, after(1))
        assert outcome.cancelled_caught
        assert not outcome.returned
        assert pipekit_clock.elapsed() == 1.0

    async def test_in_flight_stage_is_interrupted(self, pipekit_events: EventCapture) -> None:
        """The stage inside execute sees the cancellation, and is recorded CANCELLED."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("slow", delay=HOUR))
        await cancel_when(pipeline, after(1))
        assert interrupted(pipeline) == ["slow"]
        assert completed(pipeline) == ["a"]
        [cancelled] = pipekit_events.of(pk.StageCancelled)
        assert (cancelled.stage, cancelled.status) == ("slow", pk.Status.CANCELLED)

    async def test_completed_stages_are_rolled_back(self, pipekit_events: EventCapture) -> None:
        """The stages that completed before the cancellation are undone, last first."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("b")).add_stage(Probe("slow", delay=HOUR))
        await cancel_when(pipeline, after(1))
        assert undone(pipekit_events) == [("p", "b"), ("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1, "b": 1}

    async def test_run_reports_cancelled(self, pipekit_events: EventCapture) -> None:
        """The run finishes CANCELLED with a PipelineCancelledError naming the pipeline and request."""
        request = pk.PipelineRequest()
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("slow", delay=HOUR))
        await cancel_when(pipeline, after(1), request=request)
        event = finished(pipekit_events, "p")
        assert event.status is pk.Status.CANCELLED
        assert isinstance(event.error, pk.PipelineCancelledError)
        assert (event.error.pipeline, event.error.request_id) == ("p", request.id)

    async def test_later_stages_never_start(self, pipekit_events: EventCapture) -> None:
        """Stages after the interrupted one do not run and are recorded skipped."""
        later = Probe("later")
        pipeline = pk.Pipeline("p").add_stage(Probe("slow", delay=HOUR)).add_stage(later)
        await cancel_when(pipeline, after(1))
        assert later.calls == []
        assert [e.stage for e in pipekit_events.of(pk.StageSkipped)] == ["later"]
        assert rollback_calls(pipeline) == {}

    async def test_every_in_flight_parallel_stage_is_interrupted(self, pipekit_events: EventCapture) -> None:
        """Cancelling while two parallel stages run interrupts both; neither is rolled back."""
        pipeline = (
            pk.Pipeline("p").add_stage(Probe("a")).add_parallel_stages(Probe("p1", delay=HOUR), Probe("p2", delay=HOUR))
        )
        await cancel_when(pipeline, after(1))
        assert sorted(interrupted(pipeline)) == ["p1", "p2"]
        assert undone(pipekit_events) == [("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1}
        assert {(e.stage, e.status) for e in pipekit_events.of(pk.StageCancelled)} == {
            ("p1", pk.Status.CANCELLED),
            ("p2", pk.Status.CANCELLED),
        }

    async def test_rollback_runs_shielded_and_may_wait(self, pipekit_events: EventCapture) -> None:
        """A rollback that awaits something set from outside the cancelled scope still completes."""
        in_rollback = anyio.Event()
        release = anyio.Event()

        async def undo_body() -> None:
            in_rollback.set()
            await release.wait()

        pipeline = pk.Pipeline("p").add_stage(Probe("a", undo=undo_body)).add_stage(Probe("slow", delay=HOUR))
        scope = anyio.CancelScope()

        async def caller() -> None:
            with scope:
                await pipeline.execute()

        with anyio.fail_after(10 * HOUR):
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller)
                await anyio.sleep(1)
                scope.cancel()
                await in_rollback.wait()
                await anyio.wait_all_tasks_blocked()
                assert undone(pipekit_events) == []
                release.set()
        assert scope.cancelled_caught
        assert undone(pipekit_events) == [("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1}

    async def test_rollback_disabled_still_propagates(self) -> None:
        """With rollback off, a cancelled run undoes nothing and still propagates the cancellation."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("slow", delay=HOUR)).with_rollback(False)
        outcome = await cancel_when(pipeline, after(1))
        assert outcome.cancelled_caught
        assert rollback_calls(pipeline) == {}
        assert interrupted(pipeline) == ["slow"]

    async def test_caller_timeout_cancels_and_rolls_back(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """A caller's move_on_after around execute is a cancellation: stage interrupted, rollback done."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("slow", delay=HOUR))
        with anyio.move_on_after(5) as scope:
            await pipeline.execute()
        assert scope.cancelled_caught
        assert interrupted(pipeline) == ["slow"]
        assert undone(pipekit_events) == [("p", "a")]
        assert rollback_calls(pipeline) == {"a": 1}
        assert pipekit_clock.elapsed() == 5.0

    async def test_already_cancelled_caller_runs_nothing_to_completion(self) -> None:
        """Executing inside an already-cancelled scope completes no stage and compensates none."""
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(Probe("b"))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pipeline.execute()
        assert scope.cancelled_caught
        assert completed(pipeline) == []
        assert rollback_calls(pipeline) == {}

    async def test_nested_pipeline_is_interrupted_and_compensated(self, pipekit_events: EventCapture) -> None:
        """Cancelling mid-stage inside an inner pipeline undoes the inner stages, then the outer ones."""
        after_stage = Probe("after")
        inner = pk.Pipeline("inner").add_stage(Probe("x")).add_stage(Probe("slow", delay=HOUR))
        outer = pk.Pipeline("outer").add_stage(Probe("a")).add_stage(inner).add_stage(after_stage)
        outcome = await cancel_when(outer, after(1))
        assert outcome.cancelled_caught
        assert interrupted(outer) == ["slow"]
        assert undone(pipekit_events) == [("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1}
        assert after_stage.calls == []
        assert {(e.pipeline, e.stage) for e in pipekit_events.of(pk.StageCancelled)} == {
            ("inner", "slow"),
            ("outer", "inner"),
        }
        assert finished(pipekit_events, "outer").status is pk.Status.CANCELLED


class TestCancelDuringBackoff:
    async def test_cancel_during_backoff_sleep(self, pipekit_clock: FakeClock, pipekit_events: EventCapture) -> None:
        """Cancelling while a retry waits out its back-off stops the retrying and rolls back."""
        flaky = Probe("flaky", error=BoomError)
        pipeline = (
            pk.Pipeline("p").add_stage(Probe("a")).add_stage(flaky, retry=pk.RetryPolicy(max_attempts=5, jitter=0))
        )
        outcome = await cancel_when(pipeline, after(0.5))
        assert outcome.cancelled_caught
        assert [c.attempt for c in flaky.calls] == [1]
        assert [e.delay for e in pipekit_events.of(pk.StageRetrying)] == [1.0]
        assert pipekit_clock.elapsed() == 0.5  # the 1 s back-off was cut short, not waited out
        assert undone(pipekit_events) == [("p", "a")]
        [cancelled] = pipekit_events.of(pk.StageCancelled)
        assert (cancelled.stage, cancelled.status) == ("flaky", pk.Status.CANCELLED)

    async def test_injected_backoff_sleep_is_interrupted(self, pipekit_events: EventCapture) -> None:
        """A RetryPolicy's own sleep function sees the cancellation of the run waiting in it."""
        sleeping = anyio.Event()
        delays: list[float] = []
        cut_short: list[float] = []

        async def own_sleep(seconds: float) -> None:
            delays.append(seconds)
            sleeping.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cut_short.append(seconds)
                raise

        flaky = Probe("flaky", error=BoomError)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Probe("a"))
            .add_stage(flaky, retry=pk.RetryPolicy(max_attempts=5, jitter=0, sleep=own_sleep))
        )
        outcome = await cancel_when(pipeline, sleeping.wait)
        assert outcome.cancelled_caught
        assert [c.attempt for c in flaky.calls] == [1]
        assert delays == [1.0]
        assert cut_short == [1.0]
        assert undone(pipekit_events) == [("p", "a")]

    async def test_custom_backoff_delay_is_cancellable(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """Cancelling during a configured 30 s back-off: the wait was for 30 s and was interrupted."""
        flaky = Probe("flaky", error=BoomError)
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=30, max_delay=60, jitter=0)
        pipeline = pk.Pipeline("p").add_stage(Probe("a")).add_stage(flaky, retry=policy)
        outcome = await cancel_when(pipeline, after(5))
        assert [e.delay for e in pipekit_events.of(pk.StageRetrying)] == [30.0]
        assert outcome.cancelled_caught
        assert [c.attempt for c in flaky.calls] == [1]
        assert undone(pipekit_events) == [("p", "a")]
        assert pipekit_clock.elapsed() == 5.0

    async def test_default_backoff_sleep_is_cancellable(self, pipekit_clock: FakeClock) -> None:
        """With the default anyio.sleep, a back-off is interrupted at once by cancellation."""
        retrying = anyio.Event()

        async def on_event(event: pk.Event) -> None:
            if isinstance(event, pk.StageRetrying):
                retrying.set()

        flaky = Probe("flaky", error=BoomError)
        pipeline = pk.Pipeline("p").add_stage(flaky, retry=pk.RetryPolicy(max_attempts=3, jitter=0))
        outcome = await cancel_when(pipeline, retrying.wait, hooks=[on_event])
        assert pipekit_clock.elapsed() == 0.0  # not a moment of the 1 s back-off was waited
        assert outcome.cancelled_caught
        assert [c.attempt for c in flaky.calls] == [1]

    async def test_fail_fast_interrupts_a_siblings_backoff(self, pipekit_clock: FakeClock) -> None:
        """A sibling's hard failure cancels a stage waiting out its back-off; it is recorded CANCELLED."""
        flaky = Probe("flaky", error=BoomError)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(flaky, depends_on=(), retry=pk.RetryPolicy(max_attempts=5, jitter=0))
            .add_stage(Probe("bad", delay=0.5, error=BoomError), depends_on=())  # fails during flaky's 1 s back-off
        )
        response = await pipeline.execute()
        assert [c.attempt for c in flaky.calls] == [1]
        assert response.stages["flaky"].status is pk.Status.CANCELLED
        assert response.stages["bad"].status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "bad"
        assert pipekit_clock.elapsed() == 0.5


class TestFailFast:
    @staticmethod
    def group() -> pk.Pipeline:
        """a, then [slow1, slow2, bad]; bad fails a second in, while both slow stages are running."""
        return (
            pk.Pipeline("p")
            .add_stage(Probe("a"))
            .add_parallel_stages(Probe("slow1", delay=HOUR), Probe("slow2", delay=HOUR))
            .add_stage(Probe("bad", delay=1, error=BoomError), depends_on=("a",))
        )

    async def test_in_flight_siblings_are_cancelled(self, pipekit_clock: FakeClock) -> None:
        """A failing stage interrupts the stages running beside it; they end CANCELLED."""
        pipeline = self.group()
        response = await pipeline.execute()
        assert sorted(interrupted(pipeline)) == ["slow1", "slow2"]
        for name in ("slow1", "slow2"):
            result = response.stages[name]
            assert result.status is pk.Status.CANCELLED
            assert not result.rolled_back
            assert result.reason is not None
            assert "bad" in result.reason
        assert pipekit_clock.elapsed() == 1.0

    async def test_run_reports_the_failure_not_a_cancellation(self) -> None:
        """The run's error is the failing stage's, and the run is FAILED, not CANCELLED."""
        response = await self.group().execute()
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "bad"
        assert isinstance(response.error.__cause__, BoomError)
        assert response.stages["bad"].status is pk.Status.FAILED

    async def test_completed_stages_are_rolled_back_after_fail_fast(self) -> None:
        """After cancelling siblings, only the stage that completed is undone."""
        pipeline = self.group()
        response = await pipeline.execute()
        assert_rolled_back(response, ["a"])
        assert rollback_calls(pipeline) == {"a": 1}

    async def test_siblings_emit_stage_cancelled(self, pipekit_events: EventCapture) -> None:
        """Each interrupted sibling emits StageCancelled with status CANCELLED."""
        await self.group().execute()
        assert {(e.stage, e.status) for e in pipekit_events.of(pk.StageCancelled)} == {
            ("slow1", pk.Status.CANCELLED),
            ("slow2", pk.Status.CANCELLED),
        }

    async def test_tolerated_failure_cancels_nothing(self) -> None:
        """A continue_on_error failure lets the stages beside it finish."""
        pipeline = pk.Pipeline("p").add_parallel_stages(
            Probe("soft", error=BoomError),
            Probe("sibling", delay=1),  # still running when soft fails
            continue_on_error=True,
        )
        response = await pipeline.execute()
        assert interrupted(pipeline) == []
        assert completed(pipeline) == ["sibling"]
        assert response.stages["sibling"].status is pk.Status.SUCCEEDED
        assert response.stages["soft"].status is pk.Status.FAILED

    async def test_stage_timeout_cancels_siblings(self, pipekit_clock: FakeClock) -> None:
        """A stage timing out is a failure too: its running sibling is cancelled."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Probe("sibling", delay=HOUR), depends_on=())
            .add_stage(Probe("slow", delay=HOUR), depends_on=(), timeout=5)
        )
        response = await pipeline.execute()
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert response.stages["sibling"].status is pk.Status.CANCELLED
        assert sorted(interrupted(pipeline)) == ["sibling", "slow"]
        assert pipekit_clock.elapsed() == 5.0

    async def test_failure_cancels_other_branches_of_a_graph(self) -> None:
        """A failure in one branch cancels a running stage in an independent branch; its dependents never start."""
        left_next = Probe("left_next")
        pipeline = (
            pk.Pipeline("graph")
            .add_stage(Probe("left", delay=HOUR), depends_on=())
            .add_stage(left_next, depends_on=("left",))
            .add_stage(Probe("right", delay=1, error=BoomError), depends_on=())
        )
        response = await pipeline.execute()
        assert interrupted(pipeline) == ["left"]
        assert response.stages["left"].status is pk.Status.CANCELLED
        assert response.stages["left_next"].status is pk.Status.SKIPPED
        assert left_next.calls == []

    async def test_cancelled_nested_sibling_compensates_itself(self, pipekit_events: EventCapture) -> None:
        """An inner pipeline cancelled by fail-fast undoes its completed stages once, before the outer ones."""
        inner = pk.Pipeline("inner").add_stage(Probe("x")).add_stage(Probe("stuck", delay=HOUR))
        outer = (
            pk.Pipeline("outer")
            .add_stage(Probe("a"))
            .add_parallel_stages(inner, Probe("bad", delay=1, error=BoomError))
        )
        response = await outer.execute()
        assert undone(pipekit_events) == [("inner", "x"), ("outer", "a")]
        assert rollback_calls(outer) == {"a": 1, "x": 1}
        assert interrupted(outer) == ["stuck"]
        assert response.stages["inner"].status is pk.Status.CANCELLED


class TestErrorsRaisedWhileInterrupted:
    """A stage whose cleanup raises while it is being interrupted was interrupted, not failed."""

    @staticmethod
    def cleanup_fails() -> pk.FunctionStage:
        async def upload(ctx: pk.StageContext) -> None:
            try:
                await anyio.sleep(HOUR)
            finally:
                raise ConnectionResetError("connection dropped during cleanup")

        return pk.stage(name="upload")(upload)

    async def test_stage_timeout(self, pipekit_clock: FakeClock) -> None:
        """The stage's own timeout wins: TIMED_OUT, with the cleanup error as the cause."""
        response = await pk.Pipeline("p").add_stage(self.cleanup_fails(), timeout=2).execute()
        assert_status(response, pk.Status.TIMED_OUT)
        error = response.stages["upload"].error
        assert isinstance(error, pk.StageTimeoutError)
        assert isinstance(error.__cause__, ConnectionResetError)
        assert pipekit_clock.elapsed() == 2.0

    async def test_run_timeout(self, pipekit_clock: FakeClock) -> None:
        """The run's deadline wins: TIMED_OUT with PipelineTimeoutError; the cleanup error is kept on the stage."""
        response = await pk.Pipeline("p").add_stage(self.cleanup_fails()).with_timeout(2).execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.stages["upload"].status is pk.Status.TIMED_OUT
        assert isinstance(response.stages["upload"].error, ConnectionResetError)
        assert pipekit_clock.elapsed() == 2.0

    async def test_fail_fast_sibling(self, pipekit_clock: FakeClock) -> None:
        """A sibling interrupted by fail-fast is CANCELLED even though its cleanup raised."""
        breaks = MockStage("breaks", delay=1, error=BoomError("the real failure"))
        response = await pk.Pipeline("p").add_parallel_stages(self.cleanup_fails(), breaks).execute()
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "breaks"
        assert response.stages["upload"].status is pk.Status.CANCELLED
        assert pipekit_clock.elapsed() == 1.0

"""Tests for execution events: their sequence and fields, per-handle and engine-wide streams, bounded history."""

from __future__ import annotations

import time

import anyio
import attrs
import pytest

import pipekit as pk
from pipekit.testing import FakeClock, MockStage, MockStageError, capture_logs

#: The fake clock on the backends conftest.py runs every test on (asyncio in debug mode, trio).
on_fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])


def kinds(events: list[pk.Event]) -> list[tuple[str, str | None]]:
    """Each event as (class name, stage)."""
    return [(type(e).__name__, e.stage) for e in events]


async def run_in_engine(pipeline: pk.Pipeline) -> tuple[pk.PipelineResponse, list[pk.Event]]:
    """Execute ``pipeline`` in a fresh engine; return the response and the handle's events."""
    with anyio.fail_after(5):
        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline)
            await handle.wait()
        events = [e async for e in handle.events()]
    assert handle.response is not None
    return handle.response, events


class TestRunEvents:
    """The events a run emits, in order, with their fields filled in."""

    async def test_successful_run_sequence_and_fields(self) -> None:
        """A two-stage run emits start, per-stage started/succeeded, finish, all tagged with the run."""
        before = time.time()
        response, events = await run_in_engine(pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")))
        after = time.time()
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("StageStarted", "b"),
            ("StageSucceeded", "b"),
            ("PipelineFinished", None),
        ]
        for event in events:
            assert event.request_id == response.id
            assert event.pipeline == "p"
            assert event.error is None
            assert before - 0.01 <= event.timestamp <= after + 0.01
        assert [e.attempt for e in events] == [0, 1, 1, 1, 1, 0]
        finished = events[-1]
        assert isinstance(finished, pk.PipelineFinished)
        assert finished.status is pk.Status.SUCCEEDED
        assert finished.duration == pytest.approx(response.duration)

    async def test_pipeline_started_carries_request_type(self) -> None:
        """PipelineStarted carries the request's type."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(
                    pk.Pipeline("p").add_stage(MockStage("a")), pk.PipelineRequest(type="deploy")
                )
                await handle.wait()
            first = await anext(handle.events())
        assert isinstance(first, pk.PipelineStarted)
        assert first.request_type == "deploy"

    @on_fake_clock
    async def test_retry_emits_stage_retrying(self, pipekit_clock: FakeClock) -> None:
        """A failed attempt that will be retried emits StageRetrying with the attempt, error and delay."""
        flaky = MockStage("flaky", output="ok", fail_times=1)
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0.0)
        response, events = await run_in_engine(pk.Pipeline("p").add_stage(flaky, retry=policy))
        assert response.status is pk.Status.SUCCEEDED, repr(response.stages["flaky"].error)
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "flaky"),
            ("StageRetrying", "flaky"),
            ("StageSucceeded", "flaky"),
            ("PipelineFinished", None),
        ]
        retrying = events[2]
        assert isinstance(retrying, pk.StageRetrying)
        assert retrying.attempt == 1
        assert isinstance(retrying.error, MockStageError)
        assert str(retrying.error) == "flaky failed as planned (call 1 of 1)"
        assert retrying.delay == pytest.approx(1.0)
        # The run really waited the delay, on the fake clock, between the attempts.
        assert [call.time for call in flaky.calls] == pytest.approx([0.0, 1.0])
        assert pipekit_clock.elapsed() == pytest.approx(1.0)
        assert events[3].attempt == 2

    @on_fake_clock
    async def test_retrying_delay_follows_the_policy(self, pipekit_clock: FakeClock) -> None:
        """StageRetrying.delay grows from the policy's initial_delay by its multiplier."""
        flaky = MockStage("flaky", output="ok", fail_times=2)
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=0.5, multiplier=3.0, jitter=0.0)
        response, events = await run_in_engine(pk.Pipeline("p").add_stage(flaky, retry=policy))
        assert response.status is pk.Status.SUCCEEDED, repr(response.stages["flaky"].error)
        retrying = [e for e in events if isinstance(e, pk.StageRetrying)]
        assert [e.attempt for e in retrying] == [1, 2]
        assert [e.delay for e in retrying] == pytest.approx([0.5, 1.5])
        assert [str(e.error) for e in retrying] == [
            "flaky failed as planned (call 1 of 2)",
            "flaky failed as planned (call 2 of 2)",
        ]
        # Attempts 2 and 3 started after exactly those delays (virtual time).
        assert [call.time for call in flaky.calls] == pytest.approx([0.0, 0.5, 2.0])
        assert pipekit_clock.elapsed() == pytest.approx(2.0)

    async def test_failure_with_rollback_sequence(self) -> None:
        """A failing stage emits StageFailed, then rollback events, then a FAILED PipelineFinished."""
        error = RuntimeError("card declined")
        pipeline = pk.Pipeline("order").add_stage(MockStage("reserve")).add_stage(MockStage("charge", error=error))
        response, events = await run_in_engine(pipeline)
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "reserve"),
            ("StageSucceeded", "reserve"),
            ("StageStarted", "charge"),
            ("StageFailed", "charge"),
            ("RollbackStarted", None),
            ("StageRolledBack", "reserve"),
            ("RollbackFinished", None),
            ("PipelineFinished", None),
        ]
        failed = events[4]
        assert isinstance(failed, pk.StageFailed)
        assert failed.error is error
        assert failed.attempt == 1
        assert failed.status is pk.Status.FAILED
        started = events[5]
        assert isinstance(started, pk.RollbackStarted)
        assert started.stages == ("reserve",)
        rollback_finished = events[7]
        assert isinstance(rollback_finished, pk.RollbackFinished)
        assert (rollback_finished.rolled_back, rollback_finished.failed) == (1, 0)
        finished = events[-1]
        assert isinstance(finished, pk.PipelineFinished)
        assert finished.status is pk.Status.FAILED
        assert finished.error is response.error
        assert isinstance(finished.error, pk.StageFailedError)
        assert all(e.request_id == response.id and e.pipeline == "order" for e in events)

    async def test_failed_rollback_emits_stage_rollback_failed(self) -> None:
        """A rollback that raises emits StageRollbackFailed with its error, counted in RollbackFinished."""
        undo_error = OSError("cannot release")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("reserve", rollback_error=undo_error))
            .add_stage(MockStage("charge", error=ValueError()))
        )
        _, events = await run_in_engine(pipeline)
        rollback_failed = [e for e in events if isinstance(e, pk.StageRollbackFailed)]
        assert len(rollback_failed) == 1
        assert rollback_failed[0].stage == "reserve"
        assert rollback_failed[0].error is undo_error
        rollback_finished = [e for e in events if isinstance(e, pk.RollbackFinished)]
        assert [(e.rolled_back, e.failed) for e in rollback_finished] == [(0, 1)]
        assert not any(isinstance(e, pk.StageRolledBack) for e in events)

    async def test_skipped_stage_emits_stage_skipped(self) -> None:
        """A false condition emits StageSkipped with a reason; later stages still run."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_conditional_stage(MockStage("b"), when=lambda ctx: False)
            .add_stage(MockStage("c"))
        )
        _, events = await run_in_engine(pipeline)
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("StageSkipped", "b"),
            ("StageStarted", "c"),
            ("StageSucceeded", "c"),
            ("PipelineFinished", None),
        ]
        skipped = events[3]
        assert isinstance(skipped, pk.StageSkipped)
        assert "condition" in skipped.reason

    async def test_interrupted_sibling_emits_stage_cancelled(self) -> None:
        """Fail-fast interrupts a running sibling, which emits StageCancelled naming the culprit."""
        gate = MockStage("slow", output="slow", block=True)

        @pk.stage
        async def fails(ctx: pk.StageContext) -> None:
            await gate.wait_started()
            raise RuntimeError("boom")

        pipeline = pk.Pipeline("p").add_parallel_stages(fails, gate)
        response, events = await run_in_engine(pipeline)
        assert response.status is pk.Status.FAILED
        cancelled = [e for e in events if isinstance(e, pk.StageCancelled)]
        assert [e.stage for e in cancelled] == ["slow"]
        assert cancelled[0].status is pk.Status.CANCELLED
        assert "fails" in cancelled[0].reason
        assert cancelled[0].attempt == 1
        names = kinds(events)
        assert names.index(("StageFailed", "fails")) < names.index(("StageCancelled", "slow"))
        assert names[-1] == ("PipelineFinished", None)

    async def test_handle_cancel_emits_cancelled_events(self) -> None:
        """Cancelling a running execution emits StageCancelled, rollback events and a CANCELLED finish."""
        gate = MockStage("b", output="b", block=True)
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(gate)
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pipeline)
                await gate.wait_started()
                await handle.cancel()
            events = [e async for e in handle.events()]
        assert kinds(events)[-5:] == [
            ("StageCancelled", "b"),
            ("RollbackStarted", None),
            ("StageRolledBack", "a"),
            ("RollbackFinished", None),
            ("PipelineFinished", None),
        ]
        finished = events[-1]
        assert isinstance(finished, pk.PipelineFinished)
        assert finished.status is pk.Status.CANCELLED
        assert isinstance(finished.error, pk.PipelineCancelledError)

    async def test_nested_pipeline_events_name_the_inner_pipeline(self) -> None:
        """Events of a nested pipeline's stages carry the inner pipeline's name."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"))
        outer = pk.Pipeline("outer").add_stage(MockStage("a")).add_stage(inner)
        response, events = await run_in_engine(outer)
        assert response.status is pk.Status.SUCCEEDED
        by_stage = {(type(e).__name__, e.stage): e.pipeline for e in events}
        assert by_stage[("StageStarted", "x")] == "inner"
        assert by_stage[("StageSucceeded", "x")] == "inner"
        assert by_stage[("StageStarted", "a")] == "outer"
        assert by_stage[("StageSucceeded", "inner")] == "outer"
        assert all(e.request_id == response.id for e in events)


class TestEventsAreFrozen:
    """Event values are immutable."""

    async def test_assignment_raises(self) -> None:
        """Assigning to any field of any emitted event raises FrozenInstanceError."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b", error=RuntimeError()))
        _, events = await run_in_engine(pipeline)
        assert len({type(e) for e in events}) >= 6
        for event in events:
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                event.stage = "changed"  # type: ignore[misc]
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                event.timestamp = 0.0  # type: ignore[misc]
            assert event.stage != "changed"


class TestHandleEvents:
    """``handle.events()``: one execution's events from its start."""

    async def test_after_the_run_finished_yields_everything(self) -> None:
        """Called after the run finished, it yields every event from PipelineStarted and then ends."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))
                await handle.wait()
                events = [e async for e in handle.events()]
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("PipelineFinished", None),
        ]

    async def test_called_mid_run_yields_earlier_events_then_live_ones(self) -> None:
        """Called while a stage runs, it first yields the events so far, then follows until PipelineFinished."""
        gate = MockStage("b", output="b", block=True)
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(gate).add_stage(MockStage("c"))
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pipeline)
                await gate.wait_started()
                stream = handle.events()
                early = [await anext(stream) for _ in range(4)]
                assert handle.status is pk.Status.RUNNING
                gate.release()
                rest = [e async for e in stream]
        assert kinds(early) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("StageStarted", "b"),
        ]
        assert kinds(rest) == [
            ("StageSucceeded", "b"),
            ("StageStarted", "c"),
            ("StageSucceeded", "c"),
            ("PipelineFinished", None),
        ]
        assert stream.dropped == 0

    async def test_called_while_queued_yields_the_whole_run(self) -> None:
        """Called before the execution started, it yields the whole run once it happens."""
        gate = MockStage("g", output="g", block=True)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()
                queued = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))
                stream = queued.events()
                gate.release()
                events = [e async for e in stream]
        assert kinds(events) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("PipelineFinished", None),
        ]
        assert all(e.request_id == queued.id for e in events)

    async def test_readers_are_independent(self) -> None:
        """Two readers of one handle each get the complete sequence."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")))
                first = handle.events()
                one = await anext(first)
                await handle.wait()
                second = [e async for e in handle.events()]
                rest = [e async for e in first]
        assert [one, *rest] == second
        assert len(second) == 6


class TestEngineEvents:
    """``engine.events()``: live events of every execution."""

    async def test_delivers_events_of_several_executions_and_ends_on_close(self) -> None:
        """A subscriber sees both executions' complete sequences, and its iteration ends when the engine closes."""
        collected: list[pk.Event] = []
        gate = MockStage("g", output="g", block=True)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg, pk.Engine() as engine:
                stream = engine.events()

                async def collect() -> None:
                    async for event in stream:
                        collected.append(event)

                tg.start_soon(collect)
                one = await engine.submit(pk.Pipeline("one").add_stage(gate))
                two = await engine.submit(pk.Pipeline("two").add_stage(MockStage("a")))
                await gate.wait_started()
                await two.wait()
                gate.release()
            one_events = [e async for e in one.events()]
            two_events = [e async for e in two.events()]
        assert [e for e in collected if e.request_id == one.id] == one_events
        assert [e for e in collected if e.request_id == two.id] == two_events
        assert len(collected) == len(one_events) + len(two_events) == 8
        assert {e.pipeline for e in collected} == {"one", "two"}
        # The executions overlapped: "two" finished while "one" was still running.
        finished = [e.request_id for e in collected if isinstance(e, pk.PipelineFinished)]
        assert finished == [two.id, one.id]

    async def test_only_live_events(self) -> None:
        """A subscriber does not get events emitted before it subscribed."""
        collected: list[pk.Event] = []
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg, pk.Engine() as engine:
                await engine.execute(pk.Pipeline("before").add_stage(MockStage("a")))
                stream = engine.events()

                async def collect() -> None:
                    async for event in stream:
                        collected.append(event)

                tg.start_soon(collect)
                after = await engine.execute(pk.Pipeline("after").add_stage(MockStage("a")))
        assert {e.request_id for e in collected} == {after.id}
        assert kinds(collected)[0] == ("PipelineStarted", None)
        assert kinds(collected)[-1] == ("PipelineFinished", None)

    async def test_idle_subscriber_ends_when_engine_closes(self) -> None:
        """A subscriber waiting for events stops when the engine closes."""
        ended = anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg, pk.Engine() as engine:
                stream = engine.events()

                async def drain() -> None:
                    async for _ in stream:
                        pass
                    ended.set()

                tg.start_soon(drain)
                await anyio.wait_all_tasks_blocked()
                assert not ended.is_set()
            assert ended.is_set()


class TestBoundedHistory:
    """Bounded event histories tell a reader what it lost."""

    async def test_handle_history_overflow_is_reported(self) -> None:
        """With execution_history=3, a late reader gets the last 3 events and ``dropped`` counts the rest."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")).add_stage(MockStage("c"))
        with anyio.fail_after(5):
            async with pk.Engine(execution_history=3) as engine:
                handle = await engine.submit(pipeline)
                await handle.wait()
            stream = handle.events()
            with capture_logs() as logs:
                events = [e async for e in stream]
        assert kinds(events) == [("StageStarted", "c"), ("StageSucceeded", "c"), ("PipelineFinished", None)]
        assert stream.dropped == 5
        dropped_logs = [entry for entry in logs if entry["event"] == "pipekit.events.dropped"]
        assert len(dropped_logs) == 1
        assert dropped_logs[0]["log_level"] == "warning"
        assert dropped_logs[0]["dropped"] == 5

    async def test_slow_engine_subscriber_skips_ahead(self) -> None:
        """An engine subscriber that falls more than event_buffer behind skips ahead and is told."""
        with anyio.fail_after(5):
            async with pk.Engine(event_buffer=2) as engine:
                stream = engine.events()
                await engine.execute(pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")))
            with capture_logs() as logs:
                events = [e async for e in stream]
        assert kinds(events) == [("StageSucceeded", "b"), ("PipelineFinished", None)]
        assert stream.dropped == 4
        assert [entry["event"] for entry in logs] == ["pipekit.events.dropped"]

    async def test_no_loss_within_the_bound(self) -> None:
        """A reader that keeps within the history loses nothing."""
        with anyio.fail_after(5):
            async with pk.Engine(execution_history=6) as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b")))
                await handle.wait()
            stream = handle.events()
            events = [e async for e in stream]
        assert len(events) == 6
        assert stream.dropped == 0

"""Tests for the Engine actor: submitting, concurrency, backpressure, cancellation, lookup, metrics, lifecycle."""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_rolled_back, assert_status


def hanging(name: str, started: anyio.Event, interrupted: list[str]) -> pk.FunctionStage:
    """A stage that signals it started, then waits forever, noting when it is interrupted.

    Kept (not ``MockStage(block=True)``) for the tests that must see the stage's body unwound by
    the cancellation: a held mock shows it started and was never released, not that its call ended.
    """

    async def run(ctx: pk.StageContext) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            interrupted.append(name)

    return pk.stage(name=name)(run)


def status_of(handle: pk.ExecutionHandle) -> pk.Status:
    """The handle's status now (a call, so mypy does not narrow it across awaits)."""
    return handle.status


class TestEngineConstruction:
    """``pk.Engine(...)`` arguments."""

    @pytest.mark.parametrize("field", ["max_concurrent", "history_size", "execution_history", "metrics_window"])
    def test_rejects_non_positive_sizes(self, field: str) -> None:
        """A size below 1 is a ValueError naming the argument."""
        kwargs: dict[str, Any] = {field: 0}
        with pytest.raises(ValueError, match=field):
            pk.Engine(**kwargs)

    def test_rejects_negative_mailbox(self) -> None:
        """A negative mailbox size is a ValueError naming the argument."""
        with pytest.raises(ValueError, match="mailbox_size"):
            pk.Engine(mailbox_size=-1)


class TestSubmit:
    """``engine.submit`` and ``engine.execute``."""

    async def test_submit_returns_handle_with_request_id(self) -> None:
        """The handle's id is the request id and wait() returns the response."""
        request = pk.PipelineRequest(id="req-1", input={"x": 2})

        @pk.stage
        async def double(ctx: pk.StageContext) -> int:
            return int(ctx.input["x"]) * 2

        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(double), request)
                assert handle.id == "req-1"
                assert handle.request is request
                response = await handle.wait()
        assert response.id == "req-1"
        assert response.status is pk.Status.SUCCEEDED
        assert response.outputs == {"double": 4}
        assert handle.response is response
        assert handle.status is pk.Status.SUCCEEDED
        assert handle.done()

    async def test_submit_builds_request_from_input(self) -> None:
        """``input=`` builds a request with a fresh id."""
        read = MockStage("read")
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                first = await engine.submit(pk.Pipeline("p").add_stage(read), input={"k": "v"})
                second = await engine.submit(pk.Pipeline("p").add_stage(read), input={"k": "w"})
                await first.wait()
                await second.wait()
        assert [call.input for call in read.calls] == [{"k": "v"}, {"k": "w"}]
        assert [call.request_id for call in read.calls] == [first.id, second.id]
        assert first.id != second.id

    async def test_status_goes_pending_running_final(self) -> None:
        """A handle is PENDING while queued, RUNNING while its run is under way, then final."""
        gate = MockStage("block", output="block", block=True)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                first = await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()
                second = await engine.submit(pk.Pipeline("next").add_stage(MockStage("after")))
                await anyio.wait_all_tasks_blocked()
                assert status_of(first) is pk.Status.RUNNING
                assert status_of(second) is pk.Status.PENDING
                assert not first.done()
                assert first.response is None
                gate.release()
                await second.wait()
        assert first.status is pk.Status.SUCCEEDED
        assert second.status is pk.Status.SUCCEEDED

    async def test_execute_is_submit_and_wait(self) -> None:
        """``execute`` returns the finished response, also reachable through ``get``."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                response = await engine.execute(pk.Pipeline("p").add_stage(MockStage("a", output="a")), input={})
                assert response.status is pk.Status.SUCCEEDED
                assert response.outputs == {"a": "a"}
                assert engine.get(response.id).response is response

    async def test_failed_run_does_not_raise(self) -> None:
        """A stage failure is described by the response, not raised by ``execute``."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                response = await engine.execute(pk.Pipeline("p").add_stage(MockStage("boom", error=RuntimeError)))
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "boom"

    async def test_broken_definition_raises_at_submit(self) -> None:
        """An unknown dependency raises PipelineDefinitionError at submit, naming it; nothing is queued."""
        broken = pk.Pipeline("broken").add_stage(MockStage("a"), depends_on=("missing",))
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                with pytest.raises(pk.PipelineDefinitionError, match="missing"):
                    await engine.submit(broken)
                assert engine.list() == []

    async def test_duplicate_request_id_is_rejected(self) -> None:
        """Submitting a request id the engine already knows raises RuntimeError naming it."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                await engine.execute(pipeline, pk.PipelineRequest(id="same"))
                with pytest.raises(RuntimeError, match="same"):
                    await engine.submit(pipeline, pk.PipelineRequest(id="same"))

    async def test_request_and_input_together_is_type_error(self) -> None:
        """Passing both a request and ``input=`` is a TypeError."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                with pytest.raises(TypeError):
                    await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")), pk.PipelineRequest(), input={})


class TestConcurrency:
    """``max_concurrent`` and the bounded mailbox."""

    async def test_max_concurrent_limits_running_executions(self) -> None:
        """With max_concurrent=2, six executions never run more than two at a time."""
        active = 0
        peak = 0
        two_running = anyio.Event()
        release = anyio.Event()

        @pk.stage
        async def work(ctx: pk.StageContext) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active == 2:
                two_running.set()
            try:
                await release.wait()
            finally:
                active -= 1

        pipeline = pk.Pipeline("p").add_stage(work)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=2, mailbox_size=10) as engine:
                handles = [await engine.submit(pipeline) for _ in range(6)]
                await two_running.wait()
                await anyio.wait_all_tasks_blocked()
                assert active == 2
                assert engine.running == 2
                statuses = [h.status for h in handles]
                assert statuses.count(pk.Status.RUNNING) == 2
                assert statuses.count(pk.Status.PENDING) == 4
                release.set()
                responses = [await h.wait() for h in handles]
        assert peak == 2
        assert all(r.status is pk.Status.SUCCEEDED for r in responses)

    async def test_submit_waits_while_mailbox_is_full(self) -> None:
        """With one slot busy and the mailbox full, submit blocks until the first run is released."""
        gate = MockStage("block", output="block", block=True)
        q = MockStage("q")
        quick = pk.Pipeline("quick").add_stage(q)
        returned: list[pk.ExecutionHandle] = []
        attempted = 5

        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1, mailbox_size=1) as engine:
                first = await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()

                async def submit_all() -> None:
                    for _ in range(attempted):
                        returned.append(await engine.submit(quick))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit_all)
                    await anyio.wait_all_tasks_blocked()
                    # Exactly the mailbox (size 1) holds a request: the actor takes a slot
                    # before it takes a request, so the next submit must be waiting.
                    blocked_at = len(returned)
                    assert blocked_at == 1
                    assert first.status is pk.Status.RUNNING
                    assert all(h.status is pk.Status.PENDING for h in returned)
                    await anyio.wait_all_tasks_blocked()
                    assert len(returned) == blocked_at
                    gate.release()
                assert len(returned) == attempted
                responses = [await h.wait() for h in returned]
        assert first.status is pk.Status.SUCCEEDED
        assert all(r.status is pk.Status.SUCCEEDED for r in responses)
        assert [call.request_id for call in q.calls] == [h.id for h in returned]

    async def test_zero_mailbox_hands_over_directly(self) -> None:
        """With mailbox_size=0 a submit waits until the actor takes the execution."""
        gate = MockStage("block", output="block", block=True)
        returned: list[pk.ExecutionHandle] = []
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1, mailbox_size=0) as engine:
                await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()

                async def submit_two() -> None:
                    for _ in range(2):
                        returned.append(await engine.submit(pk.Pipeline("quick").add_stage(MockStage("q"))))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit_two)
                    await anyio.wait_all_tasks_blocked()
                    assert len(returned) == 0
                    gate.release()
        assert len(returned) == 2
        assert all(h.status is pk.Status.SUCCEEDED for h in returned)


class TestCancel:
    """``handle.cancel()``."""

    async def test_cancel_running_execution(self) -> None:
        """The in-flight stage stops, completed stages are rolled back, the run is CANCELLED."""
        reserve = MockStage("reserve")
        ship = MockStage("ship")
        interrupted: list[str] = []
        started = anyio.Event()
        pipeline = (
            pk.Pipeline("order").add_stage(reserve).add_stage(hanging("charge", started, interrupted)).add_stage(ship)
        )
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pipeline)
                await started.wait()
                response = await handle.cancel()
        assert interrupted == ["charge"]
        assert reserve.call_count == 1
        assert len(reserve.rollbacks) == 1
        assert ship.calls == []
        assert ship.rollbacks == []
        assert_rolled_back(response, ["reserve"])
        assert response.status is pk.Status.CANCELLED
        assert handle.status is pk.Status.CANCELLED
        assert isinstance(response.error, pk.PipelineCancelledError)
        assert response.error.request_id == handle.id
        assert response.stages["reserve"].status is pk.Status.ROLLED_BACK
        assert response.stages["reserve"].rolled_back
        assert response.stages["charge"].status is pk.Status.CANCELLED
        assert response.stages["ship"].status is pk.Status.SKIPPED

    async def test_cancel_queued_execution_runs_no_stage(self) -> None:
        """Cancelling a queued execution settles it CANCELLED without starting any of its stages."""
        gate = MockStage("block", output="block", block=True)
        a, b = MockStage("a"), MockStage("b")
        queued_pipeline = pk.Pipeline("queued").add_stage(a).add_stage(b)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                first = await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()
                queued = await engine.submit(queued_pipeline)
                status_before = status_of(queued)
                response = await queued.cancel()
                status_after = status_of(queued)
                first_status = status_of(first)
                gate.release()
        assert status_before is pk.Status.PENDING
        assert first_status is pk.Status.RUNNING
        assert a.calls == b.calls == []
        assert response.status is pk.Status.CANCELLED
        assert status_after is pk.Status.CANCELLED
        assert isinstance(response.error, pk.PipelineCancelledError)
        assert all(result.attempts == 0 for result in response.stages.values())
        assert all(result.status is not pk.Status.SUCCEEDED for result in response.stages.values())
        assert first.status is pk.Status.SUCCEEDED

    async def test_cancelled_queued_execution_is_not_run_later(self) -> None:
        """Once cancelled while queued, the actor skips the execution when its turn comes."""
        gate = MockStage("block", output="block", block=True)
        late = MockStage("late")
        after_stage = MockStage("after")

        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                await engine.submit(pk.Pipeline("blocker").add_stage(gate))
                await gate.wait_started()
                queued = await engine.submit(pk.Pipeline("queued").add_stage(late))
                after = await engine.submit(pk.Pipeline("after").add_stage(after_stage))
                await queued.cancel()
                gate.release()
                await after.wait()
        assert late.calls == []
        assert [call.request_id for call in after_stage.calls] == [after.id]
        assert queued.status is pk.Status.CANCELLED

    async def test_cancel_finished_execution_changes_nothing(self) -> None:
        """Cancelling a finished execution returns its response unchanged."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))
                response = await handle.wait()
                assert await handle.cancel() is response
        assert handle.status is pk.Status.SUCCEEDED


class TestLookup:
    """``engine.get`` and ``engine.list``."""

    async def test_get_returns_the_handle(self) -> None:
        """``get`` finds a submitted execution by id."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))
                assert engine.get(handle.id) is handle
                await handle.wait()
                assert engine.get(handle.id) is handle

    async def test_get_unknown_id_is_key_error_naming_it(self) -> None:
        """An unknown id raises KeyError naming the id."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                with pytest.raises(KeyError, match="no-such-run"):
                    engine.get("no-such-run")

    async def test_history_size_forgets_old_executions(self) -> None:
        """Beyond ``history_size`` finished executions, the oldest are forgotten."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        with anyio.fail_after(5):
            async with pk.Engine(history_size=2) as engine:
                ids = [(await engine.execute(pipeline)).id for _ in range(3)]
                with pytest.raises(KeyError, match=ids[0]):
                    engine.get(ids[0])
                assert [h.id for h in engine.list()] == ids[1:]

    async def test_list_filters_by_status(self) -> None:
        """``list`` returns executions oldest first, optionally only those in one status."""
        gate = MockStage("g", output="g", block=True)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                ok = await engine.submit(pk.Pipeline("ok").add_stage(MockStage("a")))
                await ok.wait()
                bad = await engine.submit(pk.Pipeline("bad").add_stage(MockStage("b", error=RuntimeError)))
                await bad.wait()
                running = await engine.submit(pk.Pipeline("running").add_stage(gate))
                await gate.wait_started()
                pending = await engine.submit(pk.Pipeline("pending").add_stage(MockStage("c")))
                assert engine.list() == [ok, bad, running, pending]
                assert engine.list(status=pk.Status.SUCCEEDED) == [ok]
                assert engine.list(status=pk.Status.FAILED) == [bad]
                assert engine.list(status=pk.Status.RUNNING) == [running]
                assert engine.list(status=pk.Status.PENDING) == [pending]
                assert engine.list(status=pk.Status.CANCELLED) == []
                gate.release()
        assert engine.list(status=pk.Status.SUCCEEDED) == [ok, running, pending]


class TestMetrics:
    """``engine.metrics(name)``."""

    async def test_counts_and_percentiles_after_mixed_runs(self) -> None:
        """Three successes and two failures give the right counts, rate and ordered percentiles."""
        succeeds = MockStage("maybe")
        fails = MockStage("maybe", error=RuntimeError("asked to fail"))
        # Two definitions of one pipeline (same name): engine metrics are kept by pipeline name.
        good, bad = pk.Pipeline("mixed").add_stage(succeeds), pk.Pipeline("mixed").add_stage(fails)
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                for pipeline in (good, bad, good, bad, good):
                    await engine.execute(pipeline)
                await engine.execute(pk.Pipeline("other").add_stage(MockStage("x")))
                metrics = engine.metrics("mixed")
        assert (succeeds.call_count, fails.call_count) == (3, 2)
        assert metrics.pipeline == "mixed"
        assert metrics.total_executions == 5
        assert metrics.succeeded == 3
        assert metrics.failed == 2
        assert metrics.success_rate == pytest.approx(0.6)
        assert metrics.p50 is not None
        assert metrics.p95 is not None
        assert metrics.p99 is not None
        assert 0.0 <= metrics.p50 <= metrics.p95 <= metrics.p99

    async def test_unknown_pipeline_has_empty_metrics(self) -> None:
        """A pipeline never run reports zero executions and no percentiles."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                metrics = engine.metrics("never")
        assert metrics.total_executions == 0
        assert metrics.success_rate == 0.0
        assert metrics.p50 is None
        assert metrics.p99 is None

    async def test_cancelled_runs_count_as_failed(self) -> None:
        """A cancelled execution counts as cancelled and not succeeded."""
        held = MockStage("h", block=True)
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(pk.Pipeline("c").add_stage(held))
                await held.wait_started()
                await handle.cancel()
                metrics = engine.metrics("c")
        assert held.call_count == 1
        assert not held.released  # it was never let finish: cancelled while held
        assert metrics.total_executions == 1
        assert metrics.cancelled == 1
        assert metrics.failed == 1
        assert metrics.succeeded == 0

    async def test_metrics_are_frozen(self) -> None:
        """The metrics value cannot be changed."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                await engine.execute(pk.Pipeline("p").add_stage(MockStage("a")))
                metrics = engine.metrics("p")
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            metrics.succeeded = 7  # type: ignore[misc]


class TestLifecycle:
    """Entering and leaving ``async with pk.Engine()``."""

    async def test_leaving_waits_for_running_and_queued(self) -> None:
        """Leaving the block waits until the running and the queued executions finished."""
        gate = MockStage("g", output="g", block=True)
        exiting = False
        finished_while_exiting: list[bool] = []

        @pk.stage
        async def note(ctx: pk.StageContext) -> None:
            finished_while_exiting.append(exiting)  # runs after "g", so after the release

        pipeline = pk.Pipeline("p").add_stage(gate).add_stage(note)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=1) as engine:
                running = await engine.submit(pipeline)
                queued = await engine.submit(pipeline)
                await gate.wait_started()
                assert status_of(running) is pk.Status.RUNNING
                assert status_of(queued) is pk.Status.PENDING
                exiting = True
                gate.release()
        assert finished_while_exiting == [True, True]
        assert running.status is pk.Status.SUCCEEDED
        assert queued.status is pk.Status.SUCCEEDED

    async def test_owner_cancellation_cancels_running_with_rollback(self) -> None:
        """Cancelling the owner's scope cancels the running execution; its rollback still runs."""
        reserve = MockStage("reserve")
        interrupted: list[str] = []
        started = anyio.Event()
        pipeline = pk.Pipeline("p").add_stage(reserve).add_stage(hanging("wait", started, interrupted))
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with pk.Engine() as engine:
                    handle = await engine.submit(pipeline)
                    await started.wait()
                    scope.cancel()
                    await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert interrupted == ["wait"]
        assert len(reserve.rollbacks) == 1
        assert handle.done()
        assert handle.status is pk.Status.CANCELLED
        response = handle.response
        assert response is not None
        assert isinstance(response.error, pk.PipelineCancelledError)
        assert response.stages["reserve"].status is pk.Status.ROLLED_BACK

    async def test_owner_cancellation_settles_queued_executions(self) -> None:
        """Queued executions do not outlive a cancelled engine: they end CANCELLED and never run."""
        q = MockStage("q")
        blocker = MockStage("h", block=True)
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with pk.Engine(max_concurrent=1) as engine:
                    await engine.submit(pk.Pipeline("blocker").add_stage(blocker))
                    await blocker.wait_started()
                    queued = await engine.submit(pk.Pipeline("queued").add_stage(q))
                    scope.cancel()
                    await anyio.sleep_forever()
        assert q.calls == []
        assert queued.done()
        assert queued.status is pk.Status.CANCELLED

    async def test_owner_cancellation_settles_every_queued_execution(self) -> None:
        """Every execution still in the mailbox when the owner gives up ends CANCELLED without running."""
        stages = [MockStage(f"q{i}") for i in range(4)]
        blocker = MockStage("h", block=True)
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with pk.Engine(max_concurrent=1, mailbox_size=5) as engine:
                    await engine.submit(pk.Pipeline("blocker").add_stage(blocker))
                    await blocker.wait_started()
                    queued = [await engine.submit(pk.Pipeline(f"queued-{s.name}").add_stage(s)) for s in stages]
                    scope.cancel()
                    await anyio.sleep_forever()
        assert [stage.calls for stage in stages] == [[]] * 4
        assert [h.status for h in queued] == [pk.Status.CANCELLED] * 4
        assert all(h.done() for h in queued)

    async def test_submit_before_entering_is_runtime_error(self) -> None:
        """An engine that was never entered refuses submissions with a clear RuntimeError."""
        engine = pk.Engine()
        with pytest.raises(RuntimeError, match="not running"):
            await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))

    async def test_submit_after_closing_is_runtime_error(self) -> None:
        """A closed engine refuses submissions with a clear RuntimeError."""
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                pass
        with pytest.raises(RuntimeError, match="not running"):
            await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")))

    async def test_engine_cannot_be_entered_twice(self) -> None:
        """Re-entering an engine raises RuntimeError."""
        with anyio.fail_after(5):
            engine = pk.Engine()
            async with engine:
                pass
            with pytest.raises(RuntimeError, match="once"):
                async with engine:
                    pass


class TestCancellationWindows:
    """Every handle settles with a response, whatever it was waiting for when cancelled."""

    async def test_owner_cancelled_while_a_hook_handles_pipeline_started(self) -> None:
        """A run cancelled inside its first hook call still ends CANCELLED with a response."""
        in_hook = anyio.Event()

        async def slow_hook(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                in_hook.set()
                await anyio.sleep_forever()

        s = MockStage("s")
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with pk.Engine(hooks=[slow_hook]) as engine:
                    handle = await engine.submit(pk.Pipeline("p").add_stage(s))
                    await in_hook.wait()
                    scope.cancel()
            response = await handle.wait()
        assert response.status is pk.Status.CANCELLED
        assert response.stages["s"].status is pk.Status.SKIPPED
        assert s.calls == []

    async def test_cancel_reaches_a_run_waiting_for_an_atomic_lock(self) -> None:
        """handle.cancel() of a run queued behind another run of the same atomic pipeline returns at once."""
        gate = MockStage("work", output="work", block=True)
        pipeline = pk.AtomicPipeline("atomic").add_stage(gate)
        with anyio.fail_after(5):
            async with pk.Engine(max_concurrent=2) as engine:
                first = await engine.submit(pipeline)
                await gate.wait_started()
                second = await engine.submit(pipeline)
                await anyio.wait_all_tasks_blocked()
                response = await second.cancel()
                assert response.status is pk.Status.CANCELLED
                assert response.stages["work"].status is pk.Status.SKIPPED
                assert not first.done()  # the first run was not waited for
                gate.release()
        assert first.status is pk.Status.SUCCEEDED

    async def test_owner_cancelled_while_a_run_waits_for_an_atomic_lock(self) -> None:
        """Both the running and the lock-waiting atomic run end CANCELLED with responses."""
        gate = MockStage("work", output="work", block=True)
        pipeline = pk.AtomicPipeline("atomic").add_stage(gate)
        with anyio.fail_after(5):
            with anyio.CancelScope() as scope:
                async with pk.Engine(max_concurrent=2) as engine:
                    first = await engine.submit(pipeline)
                    await gate.wait_started()
                    second = await engine.submit(pipeline)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            assert (await first.wait()).status is pk.Status.CANCELLED
            assert (await second.wait()).status is pk.Status.CANCELLED


class TestSubmitMistakes:
    """Wrong arguments to submit are clear TypeErrors, not AttributeErrors from inside."""

    async def test_submitting_a_stage(self) -> None:
        """A stage instead of a pipeline says how to wrap it."""
        async with pk.Engine() as engine:
            with pytest.raises(TypeError, match=r"takes a pipekit.Pipeline, got MockStage; wrap a single stage"):
                await engine.submit(MockStage("a"))  # type: ignore[arg-type]

    async def test_submitting_a_dict_as_request(self) -> None:
        """A mapping instead of a request points at input=."""
        async with pk.Engine() as engine:
            with pytest.raises(TypeError, match=r"got dict; pass a plain mapping as input="):
                await engine.submit(pk.Pipeline("p").add_stage(MockStage("a")), {"x": 1})  # type: ignore[arg-type]

"""Tests for hooks: pipeline, engine and per-run hooks receive every event; failing hooks are isolated."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
import structlog

import pipekit as pk
from pipekit.testing import FakeClock, MockStage, capture_logs

#: The fake clock on the backends conftest.py runs every test on (asyncio in debug mode, trio).
on_fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])


class Recorder:
    """A hook that records every event it is awaited with, optionally raising for some kinds."""

    def __init__(self, *, fail_on: tuple[type[pk.Event], ...] = ()) -> None:
        self.events: list[pk.Event] = []
        self.fail_on = fail_on

    async def __call__(self, event: pk.Event) -> None:
        self.events.append(event)
        if isinstance(event, self.fail_on):
            raise RuntimeError(f"hook broke on {event.kind}")


def kinds(events: list[pk.Event]) -> list[tuple[str, str | None]]:
    """Each event as (class name, stage)."""
    return [(type(e).__name__, e.stage) for e in events]


SUCCESS_SEQUENCE = [
    ("PipelineStarted", None),
    ("StageStarted", "a"),
    ("StageSucceeded", "a"),
    ("StageStarted", "b"),
    ("StageSucceeded", "b"),
    ("PipelineFinished", None),
]


def two_stages() -> pk.Pipeline:
    """A pipeline of two mock stages, a then b, each returning its name."""
    return pk.Pipeline("p").add_stage(MockStage("a", output="a")).add_stage(MockStage("b", output="b"))


class TestPipelineHooks:
    """``pipeline.with_hooks(h)``."""

    async def test_receives_every_event_of_a_direct_run(self) -> None:
        """A pipeline hook is awaited with every event of ``pipeline.execute()``."""
        hook = Recorder()
        with anyio.fail_after(5):
            response = await two_stages().with_hooks(hook).execute()
        assert response.status is pk.Status.SUCCEEDED
        assert kinds(hook.events) == SUCCESS_SEQUENCE
        assert all(e.request_id == response.id for e in hook.events)

    async def test_receives_the_same_events_as_the_handle_in_an_engine(self) -> None:
        """Run in an engine, a pipeline hook gets exactly the events ``handle.events()`` yields."""
        hook = Recorder()
        with anyio.fail_after(5):
            async with pk.Engine() as engine:
                handle = await engine.submit(two_stages().with_hooks(hook))
                await handle.wait()
            events = [e async for e in handle.events()]
        assert len(hook.events) == len(events) == 6
        assert all(got is expected for got, expected in zip(hook.events, events, strict=True))

    async def test_receives_failure_and_rollback_events(self) -> None:
        """A pipeline hook also gets StageFailed and the rollback events of a failing run."""
        hook = Recorder()
        pipeline = (
            pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b", error=RuntimeError)).with_hooks(hook)
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert kinds(hook.events) == [
            ("PipelineStarted", None),
            ("StageStarted", "a"),
            ("StageSucceeded", "a"),
            ("StageStarted", "b"),
            ("StageFailed", "b"),
            ("RollbackStarted", None),
            ("StageRolledBack", "a"),
            ("RollbackFinished", None),
            ("PipelineFinished", None),
        ]

    async def test_is_awaited_in_step_with_the_run(self) -> None:
        """Each hook call finishes before the run goes on, so hooks and stage bodies interleave in order."""
        a, b = MockStage("a"), MockStage("b")
        log: list[tuple[str, int, int]] = []

        async def hook(event: pk.Event) -> None:
            await anyio.lowlevel.checkpoint()
            # How many times each stage body had run when the hook call ended.
            log.append((f"{event.kind} {event.stage or ''}".strip(), a.call_count, b.call_count))

        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b).with_hooks(hook)
        with anyio.fail_after(5):
            await pipeline.execute()
        assert log == [
            ("pipeline_started", 0, 0),
            ("stage_started a", 0, 0),
            ("stage_succeeded a", 1, 0),
            ("stage_started b", 1, 0),
            ("stage_succeeded b", 1, 1),
            ("pipeline_finished", 1, 1),
        ]

    async def test_several_hooks_each_get_every_event_in_order(self) -> None:
        """Hooks added together are each awaited with every event, in the order given."""
        calls: list[tuple[str, str]] = []

        def named(label: str) -> pk.Hook:
            async def hook(event: pk.Event) -> None:
                calls.append((label, event.kind))

            return hook

        with anyio.fail_after(5):
            await pk.Pipeline("p").add_stage(MockStage("a")).with_hooks(named("first"), named("second")).execute()
        assert calls == [
            (label, kind)
            for kind in ("pipeline_started", "stage_started", "stage_succeeded", "pipeline_finished")
            for label in ("first", "second")
        ]

    async def test_with_hooks_returns_a_new_pipeline(self) -> None:
        """``with_hooks`` leaves the original pipeline without hooks."""
        hook = Recorder()
        original = two_stages()
        hooked = original.with_hooks(hook)
        with anyio.fail_after(5):
            await original.execute()
        assert hook.events == []
        assert original.hooks == ()
        assert hooked.hooks == (hook,)

    def test_rejects_non_callables(self) -> None:
        """A hook that is not callable is a PipelineDefinitionError."""
        with pytest.raises(pk.PipelineDefinitionError, match="hook"):
            two_stages().with_hooks("not a hook")  # type: ignore[arg-type]


class TestEngineHooks:
    """``pk.Engine(hooks=[h])``."""

    async def test_receives_every_event_of_every_execution(self) -> None:
        """An engine hook gets, for each execution, exactly the events its handle yields."""
        hook = Recorder()
        with anyio.fail_after(5):
            async with pk.Engine(hooks=[hook]) as engine:
                first = await engine.submit(two_stages())
                second = await engine.submit(pk.Pipeline("other").add_stage(MockStage("x", error=RuntimeError)))
                await first.wait()
                await second.wait()
            for handle in (first, second):
                expected = [e async for e in handle.events()]
                got = [e for e in hook.events if e.request_id == handle.id]
                assert got == expected
        assert len(hook.events) == 6 + 4

    async def test_pipeline_and_engine_hooks_both_receive(self) -> None:
        """A pipeline's own hooks and the engine's hooks are all awaited with every event."""
        engine_hook = Recorder()
        pipeline_hook = Recorder()
        with anyio.fail_after(5):
            async with pk.Engine(hooks=[engine_hook]) as engine:
                await engine.execute(two_stages().with_hooks(pipeline_hook))
        assert kinds(engine_hook.events) == SUCCESS_SEQUENCE
        assert kinds(pipeline_hook.events) == SUCCESS_SEQUENCE


class TestExecuteHooks:
    """``pipeline.execute(hooks=[h])``."""

    async def test_receives_every_event(self) -> None:
        """A hook passed to one run gets every event of that run, and only of that run."""
        hook = Recorder()
        pipeline = two_stages()
        with anyio.fail_after(5):
            response = await pipeline.execute(hooks=[hook])
            await pipeline.execute()
        assert kinds(hook.events) == SUCCESS_SEQUENCE
        assert {e.request_id for e in hook.events} == {response.id}

    async def test_combines_with_pipeline_hooks(self) -> None:
        """Run hooks and the pipeline's own hooks are all awaited."""
        run_hook = Recorder()
        pipeline_hook = Recorder()
        with anyio.fail_after(5):
            await two_stages().with_hooks(pipeline_hook).execute(hooks=[run_hook])
        assert kinds(run_hook.events) == SUCCESS_SEQUENCE
        assert kinds(pipeline_hook.events) == SUCCESS_SEQUENCE


class TestFailingHooks:
    """A hook that raises is logged and counted, and never breaks the run."""

    async def test_raising_hook_does_not_break_the_run(self) -> None:
        """A hook raising on every event leaves the run SUCCEEDED with all outputs."""
        hook = Recorder(fail_on=(pk.Event,))
        with anyio.fail_after(5), capture_logs():
            response = await two_stages().with_hooks(hook).execute()
        assert response.status is pk.Status.SUCCEEDED
        assert response.error is None
        assert response.outputs == {"a": "a", "b": "b"}
        assert all(r.status is pk.Status.SUCCEEDED for r in response.stages.values())
        assert len(hook.events) == 6

    async def test_raising_hook_does_not_stop_later_hooks(self) -> None:
        """Hooks after a raising one still get every event."""
        bad = Recorder(fail_on=(pk.Event,))
        good = Recorder()
        with anyio.fail_after(5), capture_logs():
            await two_stages().execute(hooks=[bad, good])
        assert kinds(good.events) == SUCCESS_SEQUENCE

    async def test_raising_hook_does_not_prevent_rollback(self) -> None:
        """In a failing run, a raising hook neither stops the rollback nor replaces the run's error."""
        hook = Recorder(fail_on=(pk.Event,))
        a = MockStage("a")
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(MockStage("b", error=RuntimeError))
        with anyio.fail_after(5), capture_logs():
            response = await pipeline.execute(hooks=[hook])
        assert len(a.rollbacks) == 1
        assert response.stages["a"].rolled_back
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "b"

    async def test_failure_is_logged_with_exc_info(self) -> None:
        """Each failed hook call is logged as ``pipekit.hook.failed`` at error level, with exc_info and context."""
        hook = Recorder(fail_on=(pk.StageStarted,))
        with anyio.fail_after(5), capture_logs() as logs:
            response = await two_stages().execute(hooks=[hook])
        failed = [entry for entry in logs if entry["event"] == "pipekit.hook.failed"]
        assert len(failed) == 2
        for entry, stage in zip(failed, ("a", "b"), strict=True):
            assert entry["log_level"] == "error"
            assert entry["exc_info"]
            assert entry["event_kind"] == "stage_started"
            assert entry["stage"] == stage
            assert entry["request_id"] == response.id
            assert entry["pipeline"] == "p"
            assert "Recorder" in entry["hook"]

    async def test_failure_log_carries_the_traceback(self) -> None:
        """Rendered, the ``pipekit.hook.failed`` entry carries the hook's traceback."""
        hook = Recorder(fail_on=(pk.PipelineStarted,))
        with anyio.fail_after(5), capture_logs(processors=[structlog.processors.format_exc_info]) as logs:
            await two_stages().execute(hooks=[hook])
        failed = [entry for entry in logs if entry["event"] == "pipekit.hook.failed"]
        assert len(failed) == 1
        traceback_text = failed[0]["exception"]
        assert "Traceback" in traceback_text
        assert "RuntimeError: hook broke on pipeline_started" in traceback_text

    async def test_failures_are_counted_on_the_response(self) -> None:
        """``response.hook_failures`` counts the hook calls that raised."""
        hook = Recorder(fail_on=(pk.StageStarted, pk.StageSucceeded))
        with anyio.fail_after(5), capture_logs():
            response = await two_stages().execute(hooks=[hook])
        assert response.hook_failures == 4

    async def test_failure_on_pipeline_finished_is_counted_on_the_response(self) -> None:
        """A hook raising on PipelineFinished counts in ``response.hook_failures`` like any other event."""
        hook = Recorder(fail_on=(pk.PipelineFinished,))
        with anyio.fail_after(5), capture_logs() as logs:
            response = await two_stages().execute(hooks=[hook])
        assert [entry["event_kind"] for entry in logs if entry["event"] == "pipekit.hook.failed"] == [
            "pipeline_finished"
        ]
        assert response.hook_failures == 1

    async def test_no_failures_counts_zero(self) -> None:
        """A run whose hooks all succeed reports zero hook failures."""
        with anyio.fail_after(5):
            response = await two_stages().execute(hooks=[Recorder()])
        assert response.hook_failures == 0

    async def test_failures_are_counted_in_engine_metrics(self) -> None:
        """``engine.metrics(name).hook_failures`` counts failed calls of engine and pipeline hooks."""
        engine_hook = Recorder(fail_on=(pk.Event,))
        pipeline_hook = Recorder(fail_on=(pk.StageStarted,))
        with anyio.fail_after(5), capture_logs():
            async with pk.Engine(hooks=[engine_hook]) as engine:
                first = await engine.execute(two_stages().with_hooks(pipeline_hook))
                second = await engine.execute(two_stages())
                metrics = engine.metrics("p")
                other = engine.metrics("other")
        assert first.status is pk.Status.SUCCEEDED
        assert second.status is pk.Status.SUCCEEDED
        # Two runs of six events each fail the engine hook; the pipeline hook fails twice in the first.
        assert metrics.hook_failures == 6 + 6 + 2
        assert metrics.succeeded == 2
        assert other.hook_failures == 0


class TestHangingHooks:
    """A hook that never returns delays a run by one hook_timeout at most."""

    @on_fake_clock
    async def test_hanging_hook_is_bounded_and_disabled(self, pipekit_clock: FakeClock) -> None:
        """A hook that hangs on every event times out once, is counted, and is not called again."""
        calls: list[str] = []

        async def hangs(event: pk.Event) -> None:
            calls.append(event.kind)
            await anyio.sleep_forever()

        stages = [MockStage(name) for name in "abc"]
        pipeline = pk.Pipeline("p").add_stage(stages[0]).add_stage(stages[1]).add_stage(stages[2])
        with anyio.fail_after(5):
            response = await pipeline.execute(hooks=[hangs], hook_timeout=0.05)
        assert response.ok
        assert calls == ["pipeline_started"]
        assert response.hook_failures == 1
        # One hook timeout in all: the stages ran right after it.
        assert pipekit_clock.elapsed() == pytest.approx(0.05)
        assert [stage.calls[0].time for stage in stages] == pytest.approx([0.05] * 3)

    @on_fake_clock
    async def test_hanging_hook_does_not_stretch_a_run_timeout(self, pipekit_clock: FakeClock) -> None:
        """With a hook hanging from mid-run, a timed-out run with many stages still ends promptly."""
        started = anyio.Event()

        async def hangs_after_start(event: pk.Event) -> None:
            # Hangs on every event from the first stage start on: the run's
            # deadline interrupts the first hang, the shielded clean-up's
            # events would each hang if the hook were not disabled.
            if isinstance(event, pk.StageStarted) or started.is_set():
                started.set()
                await anyio.sleep_forever()

        slow = [MockStage(f"s{i}", delay=3600) for i in range(10)]  # far beyond the run's deadline
        pipeline = pk.Pipeline("p").add_parallel_stages(*slow).with_timeout(0.05)
        with anyio.fail_after(5):
            response = await pipeline.execute(hooks=[hangs_after_start], hook_timeout=0.1)
        assert response.status is pk.Status.TIMED_OUT
        # At most the run timeout plus one hook timeout (0.1 s), not one per event (~20 of them).
        assert pipekit_clock.elapsed() < 0.05 + 0.1 + 1e-9
        assert response.hook_failures == 1

    @on_fake_clock
    async def test_engine_hook_timeout_is_configurable(self, pipekit_clock: FakeClock) -> None:
        """Engine(hook_timeout=...) bounds hook calls of its runs."""

        async def hangs(event: pk.Event) -> None:
            await anyio.sleep_forever()

        with anyio.fail_after(5):
            async with pk.Engine(hooks=[hangs], hook_timeout=0.05) as engine:
                response = await engine.execute(pk.Pipeline("p").add_stage(MockStage("a")))
        assert response.ok
        assert response.hook_failures == 1
        assert engine.metrics("p").hook_failures == 1
        assert pipekit_clock.elapsed() == pytest.approx(0.05)

    def test_hook_timeout_must_be_positive(self) -> None:
        """A non-positive hook timeout is refused up front."""
        with pytest.raises(ValueError, match="hook_timeout"):
            pk.Engine(hook_timeout=0)


class TestHangingHookInNestedPipelines:
    """A hook switched off after overrunning stays off in nested runs."""

    @pytest.mark.pipekit_clock
    async def test_disabled_across_nesting(self, pipekit_clock: FakeClock) -> None:
        """An engine-level hook that hangs costs one hook_timeout, however many nested pipelines have hooks."""

        async def hangs(event: pk.Event) -> None:
            await anyio.sleep_forever()

        async def quiet(event: pk.Event) -> None:
            return None

        outer = pk.Pipeline("outer")
        for i in range(3):
            outer = outer.add_stage(pk.Pipeline(f"inner{i}").add_stage(MockStage(f"s{i}")).with_hooks(quiet))
        async with pk.Engine(hooks=[hangs], hook_timeout=0.05) as engine:
            response = await engine.execute(outer)
        assert response.ok
        assert response.hook_failures == 1
        assert pipekit_clock.elapsed() == pytest.approx(0.05)

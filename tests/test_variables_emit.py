"""Pipeline variables, ``ctx.emit``, stages carrying their own retry/timeout, and the newer event fields.

- ``Pipeline.with_variables`` and ``ctx.variables`` (a nested pipeline sees the outer variables under its own);
- ``ctx.emit(EventType, **fields)`` sending custom events to a run's listeners and hooks;
- a stage's own ``retry``/``timeout`` attributes used when the builder call gives none;
- ``StageSucceeded.output`` and ``PipelineStarted/PipelineFinished.parent``.

Timeouts and back-off run on the fake clock, so nothing really sleeps.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar

import anyio
import attrs
import pytest

import pipekit as pk
from pipekit.testing import EventCapture, FakeClock, MockStage, capture_events

NO_WAIT = pk.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


@attrs.frozen(kw_only=True)
class Progress(pk.Event):
    """A custom event: how far a stage has got."""

    kind: ClassVar[str] = "progress"
    percent: int = 0


class Reporter(pk.BaseStage):
    """A stage that emits ``Progress`` at 50 and 100 percent, then returns ``done``."""

    def __init__(self, name: str = "report") -> None:
        super().__init__(name=name)

    async def execute(self, ctx: pk.StageContext) -> str:
        await ctx.emit(Progress, percent=50)
        await ctx.emit(Progress, percent=100)
        return "done"


class Flaky(pk.BaseStage):
    """Fails its first ``failures`` attempts (emitting ``Progress`` on each), then returns the attempt number."""

    name = "flaky"

    def __init__(self, failures: int = 2) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: list[int] = []

    async def execute(self, ctx: pk.StageContext) -> int:
        self.attempts.append(ctx.attempt)
        await ctx.emit(Progress, percent=ctx.attempt)
        if len(self.attempts) <= self.failures:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return ctx.attempt


class Reader:
    """A stage that records ``ctx.variables`` (as a plain dict, and the mapping itself) and returns the dict."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[str, Any] | None = None
        self.mapping: Any = None

    async def execute(self, ctx: pk.StageContext) -> dict[str, Any]:
        self.mapping = ctx.variables
        self.seen = dict(ctx.variables)
        return self.seen


class Recorder:
    """A hook recording every event it is awaited with."""

    def __init__(self) -> None:
        self.events: list[pk.Event] = []

    async def __call__(self, event: pk.Event) -> None:
        self.events.append(event)

    def progress(self) -> list[tuple[str, str | None, int, int]]:
        """(pipeline, stage, attempt, percent) of each Progress event."""
        return [(e.pipeline, e.stage, e.attempt, e.percent) for e in self.events if isinstance(e, Progress)]


def progress(events: EventCapture) -> list[tuple[str, str | None, int, int]]:
    """(pipeline, stage, attempt, percent) of each captured Progress event."""
    return [(e.pipeline, e.stage, e.attempt, e.percent) for e in events.of(Progress)]


class TestWithVariables:
    """``pipeline.with_variables(mapping, **more)``."""

    def test_merges_later_values_winning(self) -> None:
        """A mapping and keywords are merged into the existing variables; later values win."""
        base = pk.Pipeline("p").with_variables({"REGION": "eu", "ENV": "dev"})
        merged = base.with_variables({"ENV": "staging", "TIER": "gold"}, ENV="prod")
        assert dict(base.variables) == {"REGION": "eu", "ENV": "dev"}
        assert dict(merged.variables) == {"REGION": "eu", "ENV": "prod", "TIER": "gold"}
        assert dict(pk.Pipeline("p").variables) == {}

    def test_keywords_only_and_kind_kept(self) -> None:
        """Keywords alone work, and the pipeline keeps its kind and stages."""
        pipeline = pk.WorkflowPipeline("w").add_stage(MockStage("a")).with_variables(A=1)
        assert type(pipeline) is pk.WorkflowPipeline
        assert (dict(pipeline.variables), pipeline.stage_names) == ({"A": 1}, ("a",))

    def test_variables_are_a_read_only_copy(self) -> None:
        """Changing the given dict later changes nothing; the pipeline's mapping can't be written."""
        source = {"REGION": "eu"}
        pipeline = pk.Pipeline("p").with_variables(source)
        source["REGION"] = "us"
        assert pipeline.variables["REGION"] == "eu"
        with pytest.raises(TypeError):
            pipeline.variables["REGION"] = "us"  # type: ignore[index]

    @pytest.mark.parametrize("name", ["not-an-id", "1st", "", "a b", 7], ids=repr)
    def test_rejects_names_that_are_not_identifiers(self, name: Any) -> None:
        """A name that is not a Python identifier is a definition error naming it."""
        with pytest.raises(pk.PipelineDefinitionError, match="variable names must be identifiers") as info:
            pk.Pipeline("p").with_variables({name: 1})
        assert repr(name) in str(info.value)

    def test_constructor_checks_names_too(self) -> None:
        """``Pipeline(name, variables=...)`` applies the same check."""
        with pytest.raises(pk.PipelineDefinitionError, match="'bad-name'"):
            pk.Pipeline("p", variables={"bad-name": 1})
        assert dict(pk.Pipeline("p", variables={"ok": 1}).variables) == {"ok": 1}


class TestContextVariables:
    """Stages, conditions and validation read the variables as ``ctx.variables``."""

    async def test_a_stage_reads_the_variables(self) -> None:
        """``ctx.variables`` is the pipeline's variables; empty by default."""
        reader, plain = Reader("read"), Reader("plain")
        response = await pk.Pipeline("p").add_stage(reader).with_variables(IMAGE="shop:1.4").execute()
        assert response.outputs == {"read": {"IMAGE": "shop:1.4"}}
        await pk.Pipeline("q").add_stage(plain).execute()
        assert plain.seen == {}

    async def test_ctx_variables_are_read_only(self) -> None:
        """A stage cannot change the variables."""
        reader = Reader("read")
        await pk.Pipeline("p").add_stage(reader).with_variables(A=1).execute()
        with pytest.raises(TypeError):
            reader.mapping["A"] = 2

    async def test_conditions_and_validate_see_them(self) -> None:
        """``when`` conditions and a stage's ``validate`` read them too."""
        seen: list[str] = []

        def needs_region(ctx: pk.StageContext) -> None:
            seen.append(f"validate {ctx.variables['REGION']}")

        @pk.stage(validate=needs_region)
        async def deploy(ctx: pk.StageContext) -> str:
            return str(ctx.variables["REGION"])

        pipeline = (
            pk.Pipeline("p")
            .with_variables(REGION="eu", CANARY=False)
            .add_stage(deploy)
            .add_conditional_stage(MockStage("canary"), lambda ctx: bool(ctx.variables["CANARY"]))
        )
        response = await pipeline.execute()
        assert response.outputs == {"deploy": "eu"}
        assert response.stages["canary"].status is pk.Status.SKIPPED
        dry = await pipeline.execute(pk.PipelineRequest(options=pk.RequestOptions(dry_run=True)))
        assert dry.ok
        assert seen == ["validate eu", "validate eu"]

    async def test_nested_pipeline_sees_outer_variables_under_its_own(self) -> None:
        """A nested pipeline's own variables take precedence; the outer ones show through; not the other way."""
        inner_reader, deepest_reader, outer_reader = Reader("inner-read"), Reader("deepest-read"), Reader("outer-read")
        deepest = pk.Pipeline("deepest").add_stage(deepest_reader)  # no variables of its own
        inner = pk.Pipeline("inner").with_variables(REGION="us", TIER="gold").add_stage(inner_reader).add_stage(deepest)
        outer = pk.Pipeline("outer").with_variables(REGION="eu", ENV="prod").add_stage(inner).add_stage(outer_reader)
        response = await outer.execute()
        assert response.ok
        assert inner_reader.seen == {"REGION": "us", "TIER": "gold", "ENV": "prod"}
        assert deepest_reader.seen == inner_reader.seen
        assert outer_reader.seen == {"REGION": "eu", "ENV": "prod"}
        with pytest.raises(TypeError):
            inner_reader.mapping["REGION"] = "ap"

    async def test_nested_stage_validation_in_a_dry_run_sees_them(self) -> None:
        """In a dry run, a nested pipeline's stages validate with the same variables as in a real run."""
        seen: list[dict[str, Any]] = []

        def record(ctx: pk.StageContext) -> None:
            seen.append(dict(ctx.variables))

        @pk.stage(validate=record)
        async def x(ctx: pk.StageContext) -> None: ...

        inner = pk.Pipeline("inner").with_variables(B=2, A=20).add_stage(x)
        outer = pk.Pipeline("outer").with_variables(A=1).add_stage(inner)
        assert (await outer.execute(pk.PipelineRequest(options=pk.RequestOptions(dry_run=True)))).ok
        assert (await outer.execute()).ok
        assert seen == [{"A": 20, "B": 2}, {"A": 20, "B": 2}]


class TestEmit:
    """``await ctx.emit(EventType, **fields)``."""

    async def test_captured_with_the_run_fields_filled_in(self) -> None:
        """request_id, pipeline, stage, attempt and timestamp are filled in; the fields give the rest."""
        before = time.time()
        with capture_events() as events:
            response = await pk.Pipeline("p").add_stage(Reporter()).execute()
        after = time.time()
        assert response.ok
        first, second = events.of(Progress)
        assert (first.request_id, first.pipeline, first.stage, first.attempt) == (response.id, "p", "report", 1)
        assert (first.percent, second.percent, first.kind, first.error) == (50, 100, "progress", None)
        assert before <= first.timestamp <= second.timestamp <= after

    async def test_in_order_between_the_stage_events(self) -> None:
        """The custom events come after StageStarted and before StageSucceeded."""
        with capture_events() as events:
            await pk.Pipeline("p").add_stage(Reporter()).execute()
        assert events.kinds() == [
            "pipeline_started",
            "stage_started",
            "progress",
            "progress",
            "stage_succeeded",
            "pipeline_finished",
        ]

    async def test_hooks_receive_them(self) -> None:
        """Hooks passed to execute and the pipeline's own hooks receive them."""
        per_run, pipeline_hook = Recorder(), Recorder()
        pipeline = pk.Pipeline("p").add_stage(Reporter()).with_hooks(pipeline_hook)
        await pipeline.execute(hooks=[per_run])
        assert per_run.progress() == pipeline_hook.progress() == [("p", "report", 1, 50), ("p", "report", 1, 100)]

    async def test_engine_streams_them(self) -> None:
        """An engine's live stream and the execution's own stream carry them."""
        live: list[tuple[str, int]] = []
        async with anyio.create_task_group() as tg, pk.Engine() as engine:
            stream = engine.events()

            async def consume() -> None:
                async for event in stream:
                    if isinstance(event, Progress):
                        live.append((event.stage or "", event.percent))

            tg.start_soon(consume)
            handle = await engine.submit(pk.Pipeline("p").add_stage(Reporter()))
            await handle.wait()
            own = [e.percent async for e in handle.events() if isinstance(e, Progress)]
        assert own == [50, 100]
        assert live == [("report", 50), ("report", 100)]

    async def test_from_a_nested_pipeline_stage(self) -> None:
        """A nested pipeline's stage emits under the nested pipeline's name, to the outer and nested hooks."""
        outer_hook, inner_hook = Recorder(), Recorder()
        inner = pk.Pipeline("inner").add_stage(Reporter("nested-report")).with_hooks(inner_hook)
        with capture_events() as events:
            response = await pk.Pipeline("outer").add_stage(inner).execute(hooks=[outer_hook])
        assert response.ok
        expected = [("inner", "nested-report", 1, 50), ("inner", "nested-report", 1, 100)]
        assert progress(events) == outer_hook.progress() == inner_hook.progress() == expected
        assert {e.request_id for e in events.of(Progress)} == {response.id}

    async def test_from_a_retried_stage(self) -> None:
        """Each attempt's events carry that attempt's number."""
        flaky = Flaky(failures=2)
        with capture_events() as events:
            response = await pk.Pipeline("p").add_stage(flaky, retry=NO_WAIT).execute()
        assert response.outputs == {"flaky": 3}
        assert progress(events) == [("p", "flaky", 1, 1), ("p", "flaky", 2, 2), ("p", "flaky", 3, 3)]
        assert events.kinds().index("progress") < events.kinds().index("stage_retrying")

    async def test_a_no_op_when_nobody_listens(self) -> None:
        """Without listeners or hooks, emitting does nothing and the stage goes on."""
        response = await pk.Pipeline("p").add_stage(Reporter()).execute()
        assert response.outputs == {"report": "done"}

    @pytest.mark.parametrize("listening", [True, False], ids=["listening", "nobody-listening"])
    @pytest.mark.parametrize("bad", [dict, Progress(request_id="r", pipeline="p", timestamp=0.0), "progress"])
    async def test_rejects_what_is_not_an_event_class(self, bad: Any, listening: bool) -> None:
        """Anything but a ``pk.Event`` subclass is a TypeError naming it, listened to or not."""
        caught: list[TypeError] = []

        @pk.stage
        async def emitter(ctx: pk.StageContext) -> None:
            with pytest.raises(TypeError, match=re.escape("ctx.emit() takes a pipekit.Event subclass, got ")) as info:
                await ctx.emit(bad)
            caught.append(info.value)

        hooks = [Recorder()] if listening else []
        response = await pk.Pipeline("p").add_stage(emitter).execute(hooks=hooks)
        assert response.ok
        [error] = caught
        assert repr(bad) in str(error)


class Slow(pk.BaseStage):
    """Takes one (virtual) second; carries a 0.05 s timeout of its own."""

    name = "slow"
    timeout = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = 0

    async def execute(self, ctx: pk.StageContext) -> str:
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class():
            self.interrupted += 1
            raise
        return "finished"


class Stubborn(pk.BaseStage):
    """Always fails; carries a retry policy of two attempts."""

    name = "stubborn"
    retry = pk.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[int] = []

    async def execute(self, ctx: pk.StageContext) -> None:
        self.attempts.append(ctx.attempt)
        raise ConnectionError("registry unavailable")


class Odd(pk.BaseStage):
    """Has ``retry`` and ``timeout`` attributes that are not policies: they are ignored."""

    name = "odd"
    retry = 3
    timeout = "30s"

    async def execute(self, ctx: pk.StageContext) -> None: ...


class Flagged(pk.BaseStage):
    """A boolean ``timeout`` attribute is not a number of seconds: ignored."""

    name = "flagged"
    timeout = True

    async def execute(self, ctx: pk.StageContext) -> None: ...


class Broken(pk.BaseStage):
    """Carries a timeout that is not a valid number of seconds."""

    name = "broken"
    timeout = -1

    async def execute(self, ctx: pk.StageContext) -> None: ...


class TestStageCarriedPolicies:
    """The builder uses a stage's own ``retry`` and ``timeout`` unless its call gives them."""

    def test_own_policies_are_used_by_every_builder_method(self) -> None:
        """add_stage, add_parallel_stages and add_conditional_stage take the stage's own retry and timeout."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(Stubborn())
            .add_parallel_stages(Slow())
            .add_conditional_stage(Flaky(), lambda ctx: True)
        )
        stubborn, slow, flaky = pipeline.entries
        assert (stubborn.retry, stubborn.timeout) == (Stubborn.retry, None)
        assert (slow.retry, slow.timeout) == (None, 0.05)
        assert (flaky.retry, flaky.timeout) == (None, None)

    def test_builder_arguments_win(self) -> None:
        """A retry or timeout passed to the builder replaces the stage's own."""
        policy = pk.RetryPolicy(max_attempts=4)
        pipeline = (
            pk.Pipeline("p").add_stage(Stubborn(), retry=policy, timeout=9).add_parallel_stages(Slow(), timeout=2)
        )
        stubborn, slow = pipeline.entries
        assert (stubborn.retry, stubborn.timeout) == (policy, 9.0)
        assert slow.timeout == 2.0

    def test_attributes_that_are_not_policies_are_ignored(self) -> None:
        """A non-RetryPolicy ``retry``, a string or boolean ``timeout`` leave the entry's policies unset."""
        odd, flagged = pk.Pipeline("p").add_stage(Odd()).add_stage(Flagged()).entries
        assert (odd.retry, odd.timeout, flagged.timeout) == (None, None, None)

    def test_an_invalid_own_timeout_is_a_definition_error(self) -> None:
        """A stage carrying a non-positive timeout is refused where it is added, naming it."""
        with pytest.raises(pk.PipelineDefinitionError, match="stage 'broken': timeout must be a number of seconds"):
            pk.Pipeline("p").add_stage(Broken())

    def test_nested_pipelines_are_excluded(self) -> None:
        """A nested pipeline's ``timeout`` (its run timeout) and ``retry`` (its stages' default) stay its own."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).with_timeout(5).with_retry(NO_WAIT)
        [entry] = pk.Pipeline("outer").add_stage(inner).entries
        assert (entry.retry, entry.timeout) == (None, None)


@pytest.mark.pipekit_clock
class TestStageCarriedPoliciesAtRunTime:
    """The carried policies take effect, and the pipeline's defaults apply only after them."""

    async def test_own_timeout_times_out(self, pipekit_clock: FakeClock) -> None:
        """A stage with ``timeout = 0.05`` is cut off after 0.05 (virtual) seconds."""
        slow = Slow()
        response = await pk.Pipeline("p").add_stage(slow).execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.error.stage == "slow"
        assert slow.interrupted == 1
        assert pipekit_clock.elapsed() == pytest.approx(0.05)

    async def test_builder_timeout_wins_at_run_time(self, pipekit_clock: FakeClock) -> None:
        """With ``timeout=2`` given to the builder, the one-second stage finishes."""
        response = await pk.Pipeline("p").add_stage(Slow(), timeout=2).execute()
        assert response.outputs == {"slow": "finished"}
        assert pipekit_clock.elapsed() == 1.0

    async def test_own_timeout_beats_the_workflow_default(self, pipekit_clock: FakeClock) -> None:
        """A workflow's per-stage timeout applies only to stages without one of their own."""
        pipeline = pk.WorkflowPipeline("w").with_timeout(10).add_stage(Slow()).add_stage(MockStage("after", delay=3))
        response = await pipeline.execute()
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert pipekit_clock.elapsed() == pytest.approx(0.05)

    async def test_own_retry_retries(self) -> None:
        """A stage with a ``retry`` policy of its own is retried by it."""
        flaky = Flaky(failures=2)
        flaky.retry = NO_WAIT  # type: ignore[attr-defined]
        response = await pk.Pipeline("p").add_stage(flaky).execute()
        assert response.outputs == {"flaky": 3}
        assert flaky.attempts == [1, 2, 3]
        assert response.stages["flaky"].attempts == 3

    async def test_own_retry_beats_the_pipeline_default(self) -> None:
        """``with_retry`` applies only to stages without a policy of their own; builder arguments beat both."""
        own, given = Stubborn(), Stubborn()
        five = pk.RetryPolicy(max_attempts=5, initial_delay=0, jitter=0)
        four = pk.RetryPolicy(max_attempts=4, initial_delay=0, jitter=0)
        await pk.Pipeline("p").with_retry(five).add_stage(own).execute()
        await pk.Pipeline("p").with_retry(five).add_stage(given, retry=four).execute()
        assert (own.attempts, given.attempts) == ([1, 2], [1, 2, 3, 4])


@pytest.mark.pipekit_clock
class TestEmitTimestamps:
    async def test_emitted_events_tell_time_like_the_runs_own(self, pipekit_clock: FakeClock) -> None:
        """On a fake clock, an emitted event is stamped on the run's clock: 10 s after the stage started."""

        @pk.stage
        async def slow(ctx: pk.StageContext) -> None:
            await anyio.sleep(10)
            await ctx.emit(Progress, percent=100)

        with capture_events() as events:
            await pk.Pipeline("p").add_stage(slow).execute()
        (started,) = events.of(pk.StageStarted)
        (progress,) = events.of(Progress)
        assert progress.timestamp - started.timestamp == pytest.approx(10)


class TestEventFields:
    """``StageSucceeded.output`` and the ``parent`` of PipelineStarted/PipelineFinished."""

    async def test_stage_succeeded_carries_the_output(self) -> None:
        """Each StageSucceeded has the stage's output; a nested pipeline's is its outputs mapping."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x", output={"digest": "sha256:1"}))
        pipeline = pk.Pipeline("outer").add_stage(MockStage("a", output=[1, 2])).add_stage(inner)
        with capture_events() as events:
            response = await pipeline.execute()
        outputs = {(e.pipeline, e.stage): e.output for e in events.of(pk.StageSucceeded)}
        assert outputs == {
            ("outer", "a"): [1, 2],
            ("inner", "x"): {"digest": "sha256:1"},
            ("outer", "inner"): response.outputs["inner"],
        }
        assert dict(response.outputs["inner"]) == {"x": {"digest": "sha256:1"}}

    def test_output_is_optional_and_kept_out_of_the_repr(self) -> None:
        """``output`` defaults to None and does not bloat the event's repr."""
        event = pk.StageSucceeded(request_id="r", pipeline="p", timestamp=0.0, stage="s", output="x" * 1000)
        assert "x" * 1000 not in repr(event)
        assert pk.StageSucceeded(request_id="r", pipeline="p", timestamp=0.0).output is None

    async def test_parent_names_the_enclosing_pipeline(self) -> None:
        """Top-level runs have no parent; nested runs name the pipeline they are nested in."""
        deepest = pk.Pipeline("deepest").add_stage(MockStage("z"))
        middle = pk.Pipeline("middle").add_stage(deepest)
        with capture_events() as events:
            response = await pk.Pipeline("outer").add_stage(middle).execute()
        assert response.ok
        started = [(e.pipeline, e.parent) for e in events.of(pk.PipelineStarted)]
        finished = [(e.pipeline, e.parent) for e in events.of(pk.PipelineFinished)]
        assert started == [("outer", None), ("middle", "outer"), ("deepest", "middle")]
        assert finished == [("deepest", "middle"), ("middle", "outer"), ("outer", None)]

    async def test_parent_on_a_failed_nested_run(self) -> None:
        """A nested run that fails still names its parent in PipelineFinished."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x", error="boom"))
        with capture_events() as events:
            response = await pk.Pipeline("outer").add_stage(inner).execute()
        assert response.status is pk.Status.FAILED
        finished = {e.pipeline: (e.parent, e.status) for e in events.of(pk.PipelineFinished)}
        assert finished == {"inner": ("outer", pk.Status.FAILED), "outer": (None, pk.Status.FAILED)}

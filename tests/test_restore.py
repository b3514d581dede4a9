"""Request options that shape a run: restored stages, the run-wide parallelism cap, and request metadata."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_rolled_back, assert_status, capture_events

#: Run the test on the fake clock (pipekit.testing), on the backends conftest's ``anyio_backend`` uses.
fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])

RESTORED = "restored from an earlier run"


def restoring(outputs: dict[str, Any], **values: Any) -> pk.PipelineRequest:
    """A request that restores ``outputs``, its input ``values``."""
    return pk.PipelineRequest(input=values, options=pk.RequestOptions(restore=outputs))


def limited(max_parallel: int) -> pk.PipelineRequest:
    """A request running at most ``max_parallel`` stages at once."""
    return pk.PipelineRequest(options=pk.RequestOptions(max_parallel=max_parallel))


class Held:
    """Stages that stay in flight until the test lets each one go, counting how many are in flight."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.peak = 0
        self.finished: list[str] = []
        self._gates: dict[str, anyio.Event] = {}

    def _gate(self, name: str) -> anyio.Event:
        return self._gates.setdefault(name, anyio.Event())

    def stage(self, name: str) -> pk.FunctionStage:
        """A stage that is in flight from its start until `release` lets it finish."""

        async def execute(ctx: pk.StageContext) -> str:
            self.running.add(name)
            self.peak = max(self.peak, len(self.running))
            try:
                await self._gate(name).wait()
            finally:
                self.running.discard(name)
            self.finished.append(name)
            return name

        return pk.stage(name=name)(execute)

    def release(self, name: str) -> None:
        """Let stage ``name`` finish."""
        self._gate(name).set()

    async def drive(
        self, pipeline: pk.Pipeline, request: pk.PipelineRequest, *, total: int, cap: int
    ) -> pk.PipelineResponse:
        """Run ``pipeline``, whose ``total`` held stages can all run at once, ``cap`` of them in flight each time.

        Each round waits until every task is blocked, asserts exactly ``min(cap, unfinished)`` stages are
        in flight (never more, and no fewer: the cap does not serialise more than it must), then lets
        one of them finish.
        """
        responses: list[pk.PipelineResponse] = []

        async def run() -> None:
            responses.append(await pipeline.execute(request))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                for unfinished in range(total, 0, -1):
                    await anyio.wait_all_tasks_blocked()
                    assert len(self.running) == min(cap, unfinished), (sorted(self.running), unfinished)
                    self.release(min(self.running))
        [response] = responses
        return response


class Yielding:
    """Stages that stay in flight for a few scheduler rounds, counting how many overlap."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.ran: list[str] = []

    def stage(self, name: str) -> pk.FunctionStage:
        """A stage that yields to the scheduler a few times while in flight."""

        async def execute(ctx: pk.StageContext) -> str:
            self.current += 1
            self.peak = max(self.peak, self.current)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            self.current -= 1
            self.ran.append(name)
            return name

        return pk.stage(name=name)(execute)


class TestRestore:
    """``RequestOptions(restore={stage: output})``: stages an earlier run completed are not run again."""

    async def test_restored_stage_is_not_executed(self) -> None:
        """A restored stage is not called and counts as succeeded with the given output, 0 attempts."""
        build = MockStage("build", output="fresh")
        test = MockStage("test", output="passed")
        pipeline = pk.Pipeline("ci").add_stage(build).add_stage(test)

        response = await pipeline.execute(restoring({"build": "shop:1.4.2"}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert build.calls == []
        assert [call.stage for call in test.calls] == ["test"]
        result = response.stages["build"]
        assert (result.status, result.output, result.attempts, result.reason) == (
            pk.Status.SUCCEEDED,
            "shop:1.4.2",
            0,
            RESTORED,
        )
        assert response.outputs == {"build": "shop:1.4.2", "test": "passed"}

    async def test_later_stages_see_the_restored_output(self) -> None:
        """``ctx.outputs[name]`` of a restored stage is the restored value."""
        build = MockStage("build", output="fresh")
        push = MockStage("push", output="pushed")
        pipeline = pk.Pipeline("release").add_stage(build).add_stage(push)

        await pipeline.execute(restoring({"build": {"digest": "sha256:feed"}}, version="1.4.2"))

        [call] = push.calls
        assert call.outputs == {"build": {"digest": "sha256:feed"}}
        assert call.input == {"version": "1.4.2"}

    async def test_restored_stage_emits_a_restored_success(self) -> None:
        """A restored stage emits StageSucceeded(restored=True, attempt=0, output=...) and no StageStarted."""
        pipeline = pk.Pipeline("ci").add_stage(MockStage("build", output="x")).add_stage(MockStage("test", output="y"))

        with capture_events() as events:
            await pipeline.execute(restoring({"build": "restored"}))

        assert [event.kind for event in events.for_stage("build")] == ["stage_succeeded"]
        successes = {event.stage: event for event in events.of(pk.StageSucceeded)}
        assert (successes["build"].restored, successes["build"].attempt, successes["build"].output) == (
            True,
            0,
            "restored",
        )
        assert (successes["test"].restored, successes["test"].attempt, successes["test"].output) == (False, 1, "y")

    async def test_a_failure_rolls_back_only_the_stages_this_run_executed(self) -> None:
        """A later failure compensates what this run did; a restored stage is never rolled back by it."""
        build = MockStage("build", output="image")
        push = MockStage("push", output="tag")
        deploy = MockStage("deploy", error="cluster unreachable")
        pipeline = pk.Pipeline("release").add_stage(build).add_stage(push).add_stage(deploy)

        with capture_events() as events:
            response = await pipeline.execute(restoring({"build": "image"}))

        assert_status(response, pk.Status.FAILED)
        assert_rolled_back(response, ["push"])
        assert build.rollbacks == []
        assert [call.stage for call in push.rollbacks] == ["push"]
        assert response.stages["build"].status is pk.Status.SUCCEEDED
        assert response.stages["build"].rolled_back is False
        [started] = events.of(pk.RollbackStarted)
        assert started.stages == ("push",)

    async def test_dependents_in_a_graph_run_after_a_restored_root(self) -> None:
        """Every dependent of a restored stage runs, concurrently as usual, seeing its output."""
        checkout = MockStage("checkout", output="3f2a9c1")
        unit = MockStage("unit", output="ok")
        lint = MockStage("lint", output="clean")
        pipeline = pk.Pipeline("ci").add_stage(checkout).add_parallel_stages(unit, lint, limit=1)

        response = await pipeline.execute(restoring({"checkout": "abc123"}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert checkout.calls == []
        assert [call.outputs["checkout"] for call in (*unit.calls, *lint.calls)] == ["abc123", "abc123"]

    async def test_restored_parallel_member_frees_its_group(self) -> None:
        """A restored member of a parallel group does not run; the rest of the group does."""
        unit = MockStage("unit", output="fresh")
        lint = MockStage("lint", output="clean")
        package = MockStage("package")
        pipeline = pk.Pipeline("ci").add_parallel_stages(unit, lint, limit=1).add_stage(package)

        response = await pipeline.execute(restoring({"unit": "from before"}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert (unit.call_count, lint.call_count, package.call_count) == (0, 1, 1)
        assert package.calls[0].outputs == {"unit": "from before", "lint": "clean"}

    async def test_inner_stage_names_of_a_nested_pipeline_are_ignored(self) -> None:
        """Only top-level stages are restored: a nested pipeline's inner stage of that name still runs."""
        migrate = MockStage("migrate", output="migrated")
        database = pk.Pipeline("database").add_stage(migrate)
        pipeline = pk.Pipeline("release").add_stage(MockStage("build", output="image")).add_stage(database)

        response = await pipeline.execute(restoring({"migrate": "from before"}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert migrate.call_count == 1
        assert response.outputs["database"] == {"migrate": "migrated"}

    async def test_a_nested_pipeline_is_restored_as_one_stage(self) -> None:
        """Restoring a nested pipeline's stage name (its own name) skips the whole nested run."""
        migrate = MockStage("migrate", output="migrated")
        database = pk.Pipeline("database").add_stage(migrate)
        switch = MockStage("switch")
        pipeline = pk.Pipeline("release").add_stage(database).add_stage(switch)

        with capture_events() as events:
            response = await pipeline.execute(restoring({"database": {"migrate": "from before"}}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert migrate.calls == []
        assert switch.calls[0].outputs == {"database": {"migrate": "from before"}}
        assert [event.pipeline for event in events.of(pk.PipelineStarted)] == ["release"]

    async def test_unknown_names_are_ignored(self) -> None:
        """Names that are no stage of the pipeline change nothing."""
        build = MockStage("build", output="image")
        pipeline = pk.Pipeline("ci").add_stage(build)

        response = await pipeline.execute(restoring({"no-such-stage": 1, "also-missing": None}))

        assert_status(response, pk.Status.SUCCEEDED)
        assert build.call_count == 1
        assert response.outputs == {"build": "image"}
        assert response.stages["build"].attempts == 1

    async def test_restored_outputs_may_be_falsy(self) -> None:
        """A restored None, 0 or empty value still counts as restored."""
        stages = [MockStage(name, output="fresh") for name in ("a", "b", "c")]
        pipeline = pk.Pipeline("p").add_stage(stages[0]).add_stage(stages[1]).add_stage(stages[2])

        response = await pipeline.execute(restoring({"a": None, "b": 0, "c": {}}))

        assert [stage.call_count for stage in stages] == [0, 0, 0]
        assert response.outputs == {"a": None, "b": 0, "c": {}}

    def test_restore_is_read_only_and_empty_by_default(self) -> None:
        """``restore`` defaults to empty, and the option cannot be changed afterwards."""
        source = {"build": "image"}
        options = pk.RequestOptions(restore=source)
        source["build"] = "changed"

        assert dict(pk.RequestOptions().restore) == {}
        assert dict(options.restore) == {"build": "image"}
        with pytest.raises(TypeError):
            options.restore["build"] = "other"  # type: ignore[index]


class TestMaxParallel:
    """``RequestOptions(max_parallel=N)``: at most N stages run at once in the whole run tree."""

    @pytest.mark.parametrize("value", [0, -1, True, False, "2", 1.5])
    def test_rejects_anything_but_a_positive_integer(self, value: object) -> None:
        """0, negatives, booleans, strings and floats are a ValueError naming the option."""
        with pytest.raises(ValueError, match=r"max_parallel must be an integer >= 1, got"):
            pk.RequestOptions(max_parallel=value)  # type: ignore[arg-type]

    def test_defaults_to_no_limit(self) -> None:
        """Without it there is no run-wide cap; 1 is a valid cap."""
        assert pk.RequestOptions().max_parallel is None
        assert pk.RequestOptions(max_parallel=1).max_parallel == 1

    async def test_at_most_n_stages_are_in_flight(self) -> None:
        """Five concurrent stages under max_parallel=2 run exactly two at a time until the last."""
        held = Held()
        names = [f"shard-{n}" for n in range(5)]
        pipeline = pk.Pipeline("tests").add_parallel_stages(*(held.stage(name) for name in names))

        response = await held.drive(pipeline, limited(2), total=5, cap=2)

        assert_status(response, pk.Status.SUCCEEDED)
        assert held.peak == 2
        assert sorted(held.finished) == names

    async def test_stages_of_nested_pipelines_count_against_the_cap(self) -> None:
        """A nested pipeline's stages share the outer run's slots; the nested stage itself takes none."""
        held = Held()
        inner = pk.Pipeline("inner").add_parallel_stages(held.stage("i1"), held.stage("i2"), held.stage("i3"))
        pipeline = pk.Pipeline("outer").add_parallel_stages(inner, held.stage("o1"), held.stage("o2"))

        response = await held.drive(pipeline, limited(2), total=5, cap=2)

        assert_status(response, pk.Status.SUCCEEDED)
        assert held.peak == 2
        assert sorted(held.finished) == ["i1", "i2", "i3", "o1", "o2"]

    async def test_without_a_cap_every_ready_stage_runs(self) -> None:
        """The same stages all run at once when max_parallel is not set (the check above can fail)."""
        held = Held()
        pipeline = pk.Pipeline("tests").add_parallel_stages(*(held.stage(f"shard-{n}") for n in range(5)))

        response = await held.drive(pipeline, pk.PipelineRequest(), total=5, cap=5)

        assert_status(response, pk.Status.SUCCEEDED)
        assert held.peak == 5

    async def test_a_cap_of_one_with_nested_pipelines_does_not_deadlock(self) -> None:
        """max_parallel=1 runs nested pipelines' stages one by one, and finishes."""
        gauge = Yielding()
        deeper = pk.Pipeline("deeper").add_parallel_stages(gauge.stage("d1"), gauge.stage("d2"))
        inner = pk.Pipeline("inner").add_parallel_stages(gauge.stage("i1"), deeper, gauge.stage("i2"))
        pipeline = (
            pk.Pipeline("outer")
            .add_stage(gauge.stage("first"))
            .add_parallel_stages(inner, gauge.stage("o1"), gauge.stage("o2"))
            .add_stage(gauge.stage("last"))
        )

        with anyio.fail_after(10):
            response = await pipeline.execute(limited(1))

        assert_status(response, pk.Status.SUCCEEDED)
        assert gauge.peak == 1
        assert sorted(gauge.ran) == sorted(["first", "i1", "d1", "d2", "i2", "o1", "o2", "last"])

    async def test_a_stage_running_a_pipeline_itself_does_not_deadlock(self) -> None:
        """A stage calling ``inner.execute(ctx)`` under max_parallel=1 holds one slot for all of it."""
        gauge = Yielding()
        inner = pk.Pipeline("inner").add_parallel_stages(gauge.stage("i1"), gauge.stage("i2"))

        @pk.stage
        async def wrapper(ctx: pk.StageContext) -> Any:
            return await inner.execute(ctx)

        pipeline = pk.Pipeline("outer").add_stage(wrapper).add_stage(gauge.stage("after"))

        with anyio.fail_after(10):
            response = await pipeline.execute(limited(1))

        assert_status(response, pk.Status.SUCCEEDED)
        assert response.outputs["wrapper"] == {"i1": "i1", "i2": "i2"}
        assert sorted(gauge.ran) == ["after", "i1", "i2"]

    async def test_the_cap_applies_with_a_parallel_group_limit(self) -> None:
        """The tighter of a group's ``limit`` and the run's max_parallel wins."""
        wide, narrow = Yielding(), Yielding()
        names = [f"shard-{n}" for n in range(6)]

        response_wide = await (
            pk.Pipeline("tests").add_parallel_stages(*(wide.stage(name) for name in names), limit=4).execute(limited(2))
        )
        response_narrow = await (
            pk.Pipeline("tests")
            .add_parallel_stages(*(narrow.stage(name) for name in names), limit=2)
            .execute(limited(4))
        )

        assert_status(response_wide, pk.Status.SUCCEEDED)
        assert_status(response_narrow, pk.Status.SUCCEEDED)
        assert (wide.peak, narrow.peak) == (2, 2)

    async def test_each_run_has_its_own_cap(self) -> None:
        """Two engine executions with max_parallel=1 each run one stage at a time, side by side."""
        held = Held()
        first = pk.Pipeline("first").add_parallel_stages(held.stage("a1"), held.stage("a2"))
        second = pk.Pipeline("second").add_parallel_stages(held.stage("b1"), held.stage("b2"))

        with anyio.fail_after(10):
            async with pk.Engine() as engine:
                handles = [await engine.submit(p, limited(1)) for p in (first, second)]
                for _ in range(2):
                    await anyio.wait_all_tasks_blocked()
                    assert len(held.running) == 2
                    assert {name[0] for name in held.running} == {"a", "b"}
                    for name in sorted(held.running):
                        held.release(name)
                responses = [await handle.wait() for handle in handles]

        assert [response.status for response in responses] == [pk.Status.SUCCEEDED] * 2
        assert held.peak == 2

    async def test_a_stage_keeps_its_slot_through_its_retries(self) -> None:
        """While a stage waits to retry, another ready stage does not take its slot."""
        gauge = Yielding()
        flaky = MockStage("flaky", output="ok", fail_times=2)
        retry = pk.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
        # Two roots: the first runs inline and takes the slot; the other waits for it.
        pipeline = pk.Pipeline("p").add_stage(flaky, retry=retry).add_stage(gauge.stage("other"), depends_on=())

        with capture_events() as events:
            response = await pipeline.execute(limited(1))

        assert_status(response, pk.Status.SUCCEEDED)
        assert flaky.call_count == 3
        assert [(e.stage, e.kind) for e in events.events if e.stage is not None] == [
            ("flaky", "stage_started"),
            ("flaky", "stage_retrying"),
            ("flaky", "stage_retrying"),
            ("flaky", "stage_succeeded"),
            ("other", "stage_started"),
            ("other", "stage_succeeded"),
        ]

    @fake_clock
    async def test_the_cap_stretches_the_run_on_the_fake_clock(self) -> None:
        """Four 10 s stages take 20 s at max_parallel=2, 40 s at 1 and 10 s without a cap."""
        stages = [MockStage(f"shard-{n}", delay=10) for n in range(4)]
        pipeline = pk.Pipeline("tests").add_parallel_stages(*stages)

        durations = []
        for request in (limited(2), limited(1), pk.PipelineRequest()):
            start = anyio.current_time()
            response = await pipeline.execute(request)
            assert_status(response, pk.Status.SUCCEEDED)
            durations.append(anyio.current_time() - start)

        assert durations == [20, 40, 10]


class TestRequestMetadata:
    """``PipelineRequest(metadata=...)`` reaches ``PipelineStarted``."""

    async def test_metadata_reaches_pipeline_started(self) -> None:
        """The run's PipelineStarted carries the request's metadata."""
        pipeline = pk.Pipeline("ci").add_stage(MockStage("build"))
        metadata = {"pipekit.trigger": "webhook", "commit": "3f2a9c1"}

        with capture_events() as events:
            await pipeline.execute(pk.PipelineRequest(metadata=metadata))

        [started] = events.of(pk.PipelineStarted)
        assert dict(started.metadata) == metadata

    async def test_metadata_reaches_engine_hooks(self) -> None:
        """An engine's hooks see the metadata of a submitted request."""
        seen: list[dict[str, str]] = []

        async def hook(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                seen.append(dict(event.metadata))

        async with pk.Engine(hooks=[hook]) as engine:
            await engine.execute(
                pk.Pipeline("ci").add_stage(MockStage("build")), pk.PipelineRequest(metadata={"k": "v"})
            )

        assert seen == [{"k": "v"}]

    async def test_metadata_defaults_to_empty(self) -> None:
        """Without metadata, PipelineStarted.metadata is empty."""
        with capture_events() as events:
            await pk.Pipeline("ci").add_stage(MockStage("build")).execute()

        [started] = events.of(pk.PipelineStarted)
        assert dict(started.metadata) == {}

    def test_metadata_is_frozen_strings(self) -> None:
        """Metadata is copied, its keys and values made strings, and cannot be changed."""
        source: dict[str, Any] = {"attempt": 2}
        request = pk.PipelineRequest(metadata=source)
        source["attempt"] = 3

        assert dict(request.metadata) == {"attempt": "2"}
        with pytest.raises(TypeError):
            request.metadata["attempt"] = "4"  # type: ignore[index]

"""Building pipelines: immutable values, unique names, dependencies, options and nesting."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_rolled_back, assert_stage_order, assert_status, capture_events

#: Run the test on the fake clock (pipekit.testing), on the backends conftest's ``anyio_backend`` uses.
fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])

#: How long a "hanging" mock stage takes: far beyond every timeout here (virtual time, on the fake clock).
HOUR = 3600.0


class TestImmutability:
    """Every builder returns a new pipeline and leaves the old one unchanged."""

    def test_add_stage_returns_new_pipeline(self) -> None:
        """add_stage returns a different pipeline; the original has no stages."""
        empty = pk.Pipeline("p")
        one = empty.add_stage(MockStage("a"))
        assert one is not empty
        assert empty.stage_names == ()
        assert one.stage_names == ("a",)

    def test_add_conditional_stage_returns_new_pipeline(self) -> None:
        """add_conditional_stage leaves the original pipeline without the stage."""
        base = pk.Pipeline("p").add_stage(MockStage("a"))
        more = base.add_conditional_stage(MockStage("b"), lambda ctx: True)
        assert base.stage_names == ("a",)
        assert more.stage_names == ("a", "b")

    def test_add_parallel_stages_returns_new_pipeline(self) -> None:
        """add_parallel_stages leaves the original pipeline without the group."""
        base = pk.Pipeline("p")
        more = base.add_parallel_stages(MockStage("a"), MockStage("b"), limit=1)
        assert base.stage_names == ()
        assert more.stage_names == ("a", "b")

    def test_policy_builders_return_new_pipelines(self) -> None:
        """with_retry/with_timeout/with_rollback/with_hooks never change the original."""
        base = pk.Pipeline("p").add_stage(MockStage("a"))
        policy = pk.RetryPolicy(max_attempts=2)

        async def hook(event: pk.Event) -> None:
            return None

        retried = base.with_retry(policy)
        timed = base.with_timeout(5)
        no_rollback = base.with_rollback(False, timeout=3)
        hooked = base.with_hooks(hook)
        assert (base.retry, base.timeout, base.rollback_enabled, base.rollback_timeout, base.hooks) == (
            None,
            None,
            True,
            60.0,
            (),
        )
        assert retried.retry is policy
        assert timed.timeout == 5.0
        assert (no_rollback.rollback_enabled, no_rollback.rollback_timeout) == (False, 3.0)
        assert hooked.hooks == (hook,)
        assert all(p is not base for p in (retried, timed, no_rollback, hooked))

    def test_replace_stage_returns_new_pipeline(self) -> None:
        """replace_stage leaves the original pipeline holding the old stage."""
        old_stage = MockStage("a", output=1)
        base = pk.Pipeline("p").add_stage(old_stage)
        replaced = base.replace_stage("a", MockStage("a", output=2))
        assert replaced is not base
        assert base.entries[0].stage is old_stage
        assert replaced.entries[0].stage is not old_stage

    def test_attributes_cannot_be_assigned(self) -> None:
        """A pipeline is frozen: assigning an attribute raises."""
        pipeline = pk.Pipeline("p")
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            pipeline.name = "q"  # type: ignore[misc]

    async def test_branches_from_one_base_are_independent(self) -> None:
        """Two pipelines built from one base each run only their own stages."""
        a, b, c = MockStage("a"), MockStage("b"), MockStage("c")
        base = pk.Pipeline("p").add_stage(a)
        left = base.add_stage(b)
        right = base.add_stage(c)
        for pipeline, expected in ((left, ["a", "b"]), (right, ["a", "c"]), (base, ["a"])):
            response = await pipeline.execute()
            assert_status(response, pk.Status.SUCCEEDED)
            assert_stage_order(response, expected)
        assert [m.call_count for m in (a, b, c)] == [3, 1, 1]


class TestStageNames:
    """Stage names: order, uniqueness and validity."""

    def test_stage_names_in_order_added(self) -> None:
        """stage_names lists every stage in the order it was added, groups included."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_parallel_stages(MockStage("b"), MockStage("c"))
            .add_conditional_stage(MockStage("d"), lambda ctx: True)
        )
        assert pipeline.stage_names == ("a", "b", "c", "d")

    def test_duplicate_name_rejected(self) -> None:
        """Adding a second stage with a used name raises PipelineDefinitionError naming it."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("fetch"))
        with pytest.raises(pk.PipelineDefinitionError, match="'fetch'"):
            pipeline.add_stage(MockStage("fetch"))

    def test_duplicate_name_within_parallel_group_rejected(self) -> None:
        """Two stages of one parallel group cannot share a name."""
        with pytest.raises(pk.PipelineDefinitionError, match="'x'"):
            pk.Pipeline("p").add_parallel_stages(MockStage("x"), MockStage("x"))

    def test_duplicate_of_nested_pipeline_name_rejected(self) -> None:
        """A nested pipeline's name counts as a stage name."""
        inner = pk.Pipeline("inner").add_stage(MockStage("a"))
        outer = pk.Pipeline("outer").add_stage(MockStage("inner"))
        with pytest.raises(pk.PipelineDefinitionError, match="'inner'"):
            outer.add_stage(inner)

    def test_definition_error_is_value_error(self) -> None:
        """PipelineDefinitionError is a PipekitError and a ValueError."""
        with pytest.raises(pk.PipelineDefinitionError) as info:
            pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("a"))
        assert isinstance(info.value, pk.PipekitError)
        assert isinstance(info.value, ValueError)

    def test_empty_pipeline_name_rejected(self) -> None:
        """A pipeline needs a non-empty name."""
        with pytest.raises(pk.PipelineDefinitionError, match="name"):
            pk.Pipeline("")

    def test_stage_without_name_rejected(self) -> None:
        """An object without a string name is not a stage."""

        class Nameless:
            async def execute(self, ctx: pk.StageContext) -> None:
                return None

        with pytest.raises(pk.PipelineDefinitionError, match="name"):
            pk.Pipeline("p").add_stage(Nameless())  # type: ignore[arg-type]

    def test_stage_without_execute_rejected(self) -> None:
        """An object without execute() is not a stage, and the message names it."""

        class Lazy:
            name = "lazy"

        with pytest.raises(pk.PipelineDefinitionError, match=r"'lazy'.*execute"):
            pk.Pipeline("p").add_stage(Lazy())  # type: ignore[arg-type]


class TestDependsOn:
    """Explicit dependencies, unknown names, self-dependencies and cycles."""

    def test_unknown_dependency_allowed_while_building(self) -> None:
        """A forward reference is accepted by add_stage (the stage may come later)."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("b"), depends_on=("a",))
        assert pipeline.stage_names == ("b",)

    def test_unknown_dependency_rejected_by_check(self) -> None:
        """check() names the unknown dependency and the stage that declared it."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b"), depends_on=("ghost",))
        with pytest.raises(pk.PipelineDefinitionError, match="'ghost'") as info:
            pipeline.check()
        assert "'b'" in str(info.value)

    def test_every_unknown_dependency_named(self) -> None:
        """All unknown dependencies are named in one error, not just the first."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"), depends_on=("ghost1",))
            .add_stage(MockStage("b"), depends_on=("ghost2",))
        )
        with pytest.raises(pk.PipelineDefinitionError) as info:
            pipeline.check()
        assert "'ghost1'" in str(info.value)
        assert "'ghost2'" in str(info.value)

    async def test_unknown_dependency_rejected_by_execute_before_running(self) -> None:
        """execute() raises PipelineDefinitionError naming the unknown stage before any stage runs."""
        a, b = MockStage("a"), MockStage("b")
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b, depends_on=("nope",))
        with pytest.raises(pk.PipelineDefinitionError, match="'nope'"):
            await pipeline.execute()
        assert (a.call_count, b.call_count) == (0, 0)

    async def test_forward_reference_resolved(self) -> None:
        """A stage may depend on one added after it; the dependency still runs first."""
        pipeline = (
            pk.Pipeline("p").add_stage(MockStage("b"), depends_on=("a",)).add_stage(MockStage("a"), depends_on=())
        )
        response = await pipeline.execute()
        assert response.ok
        assert_stage_order(response, ["a", "b"])

    async def test_single_string_dependency(self) -> None:
        """depends_on may be a single stage name."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("b"), depends_on="a").add_stage(MockStage("a"), depends_on=())
        response = await pipeline.execute()
        assert response.ok
        assert_stage_order(response, ["a", "b"])

    def test_self_dependency_rejected(self) -> None:
        """A stage depending on itself is rejected with the cycle a -> a."""
        with pytest.raises(pk.PipelineDefinitionError, match="a -> a"):
            pk.Pipeline("p").add_stage(MockStage("a"), depends_on=("a",))

    def test_non_string_dependency_rejected(self) -> None:
        """depends_on takes names, not stages."""
        a = MockStage("a")
        with pytest.raises(pk.PipelineDefinitionError, match="depends_on"):
            pk.Pipeline("p").add_stage(a).add_stage(MockStage("b"), depends_on=(a,))  # type: ignore[arg-type]

    def test_two_stage_cycle_rejected_when_closed(self) -> None:
        """The add_stage that closes a cycle raises, naming it a -> b -> a."""
        open_ = pk.Pipeline("p").add_stage(MockStage("a"), depends_on=("b",))
        with pytest.raises(pk.PipelineDefinitionError, match="a -> b -> a"):
            open_.add_stage(MockStage("b"), depends_on=("a",))

    def test_cycle_through_default_dependency_rejected(self) -> None:
        """A stage that by default follows one depending on it closes a cycle."""
        open_ = pk.Pipeline("p").add_stage(MockStage("a"), depends_on=("b",))
        with pytest.raises(pk.PipelineDefinitionError, match="a -> b -> a"):
            open_.add_stage(MockStage("b"))

    def test_three_stage_cycle_named(self) -> None:
        """A longer cycle is named in full, each stage once, the first repeated at the end."""
        open_ = pk.Pipeline("p").add_stage(MockStage("a"), depends_on=("c",)).add_stage(MockStage("b"))
        with pytest.raises(pk.PipelineDefinitionError) as info:
            open_.add_stage(MockStage("c"))
        rotations = ("a -> c -> b -> a", "c -> b -> a -> c", "b -> a -> c -> b")
        assert any(r in str(info.value) for r in rotations), str(info.value)

    def test_cycle_through_parallel_group_rejected(self) -> None:
        """A parallel group closing a cycle is rejected when it is added."""
        open_ = pk.Pipeline("p").add_stage(MockStage("a"), depends_on=("y",))
        with pytest.raises(pk.PipelineDefinitionError, match="cycle"):
            open_.add_parallel_stages(MockStage("x"), MockStage("y"))

    async def test_pipeline_before_the_cycle_stays_usable(self) -> None:
        """A rejected add_stage leaves the earlier value as it was."""
        base = (
            pk.Pipeline("p").add_stage(MockStage("a", output=1)).add_stage(MockStage("b", output=2), depends_on=("a",))
        )
        with pytest.raises(pk.PipelineDefinitionError):
            base.add_stage(MockStage("c"), depends_on=("c",))
        response = await base.execute()
        assert dict(response.outputs) == {"a": 1, "b": 2}


class TestOptions:
    """Invalid options are rejected with messages saying what is wrong."""

    @pytest.mark.parametrize("timeout", [-1, 0, -0.5, math.nan])
    def test_bad_stage_timeout_rejected(self, timeout: float) -> None:
        """A stage timeout must be a positive number; the message names the stage and the value."""
        with pytest.raises(pk.PipelineDefinitionError, match=r"'a'.*timeout") as info:
            pk.Pipeline("p").add_stage(MockStage("a"), timeout=timeout)
        assert repr(timeout) in str(info.value)

    def test_bool_timeout_rejected(self) -> None:
        """True is not a number of seconds."""
        with pytest.raises(pk.PipelineDefinitionError, match="timeout"):
            pk.Pipeline("p").add_stage(MockStage("a"), timeout=True)

    @pytest.mark.parametrize("seconds", [-1, 0, math.nan])
    def test_bad_pipeline_timeout_rejected(self, seconds: float) -> None:
        """with_timeout rejects a non-positive number of seconds."""
        with pytest.raises(pk.PipelineDefinitionError, match="timeout"):
            pk.Pipeline("p").with_timeout(seconds)

    def test_pipeline_timeout_cleared_with_none(self) -> None:
        """with_timeout(None) removes the whole-run timeout."""
        assert pk.Pipeline("p").with_timeout(2).with_timeout(None).timeout is None

    @pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
    def test_bad_parallel_limit_rejected(self, limit: Any) -> None:
        """The parallel limit must be an integer >= 1; the message shows the value."""
        with pytest.raises(pk.PipelineDefinitionError, match="limit") as info:
            pk.Pipeline("p").add_parallel_stages(MockStage("a"), MockStage("b"), limit=limit)
        assert repr(limit) in str(info.value)

    def test_empty_parallel_group_rejected(self) -> None:
        """add_parallel_stages needs at least one stage."""
        with pytest.raises(pk.PipelineDefinitionError, match="at least one"):
            pk.Pipeline("p").add_parallel_stages()

    def test_non_policy_retry_rejected(self) -> None:
        """retry= takes a RetryPolicy; the message names the stage and the type wanted."""
        with pytest.raises(pk.PipelineDefinitionError, match=r"'a'.*RetryPolicy"):
            pk.Pipeline("p").add_stage(MockStage("a"), retry=3)  # type: ignore[arg-type]

    def test_non_policy_retry_rejected_for_parallel_stages(self) -> None:
        """retry= on a parallel group is checked too."""
        with pytest.raises(pk.PipelineDefinitionError, match="RetryPolicy"):
            pk.Pipeline("p").add_parallel_stages(MockStage("a"), retry={"max_attempts": 3})  # type: ignore[arg-type]

    def test_non_policy_with_retry_rejected(self) -> None:
        """with_retry takes a RetryPolicy."""
        with pytest.raises(pk.PipelineDefinitionError, match="RetryPolicy"):
            pk.Pipeline("p").with_retry("three times")  # type: ignore[arg-type]

    def test_non_callable_condition_rejected(self) -> None:
        """when= must be callable."""
        with pytest.raises(pk.PipelineDefinitionError, match="when"):
            pk.Pipeline("p").add_conditional_stage(MockStage("a"), True)  # type: ignore[arg-type]

    def test_bad_rollback_timeout_rejected(self) -> None:
        """The rollback timeout must be positive."""
        with pytest.raises(pk.PipelineDefinitionError, match="rollback timeout"):
            pk.Pipeline("p").with_rollback(timeout=-5)

    def test_non_callable_hook_rejected(self) -> None:
        """with_hooks takes callables."""
        with pytest.raises(pk.PipelineDefinitionError, match="hooks"):
            pk.Pipeline("p").with_hooks("not a hook")  # type: ignore[arg-type]

    def test_valid_options_stored(self) -> None:
        """Valid options are kept on the entry as given."""
        policy = pk.RetryPolicy(max_attempts=4)
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"), retry=policy, timeout=2, continue_on_error=True)
        entry = pipeline.entries[0]
        assert (entry.retry, entry.timeout, entry.continue_on_error) == (policy, 2.0, True)


class TestReplaceStage:
    """replace_stage swaps a stage in place, keeping its position and policies."""

    async def test_replacement_runs(self) -> None:
        """The new pipeline runs the replacement; the old one still runs the original."""
        base = pk.Pipeline("p").add_stage(MockStage("a", output="real")).add_stage(MockStage("b", output="b"))
        assert (await base.execute()).outputs["a"] == "real"
        mocked = base.replace_stage("a", MockStage("a", output="mock"))
        assert (await mocked.execute()).outputs["a"] == "mock"
        assert (await base.execute()).outputs["a"] == "real"

    async def test_keeps_position_and_dependencies(self) -> None:
        """The replacement keeps the original's place in the order and its dependencies."""
        base = (
            pk.Pipeline("p")
            .add_stage(MockStage("c"), depends_on=("b",))
            .add_stage(MockStage("a"), depends_on=())
            .add_stage(MockStage("b"), depends_on=("a",))
        )
        new_b = MockStage("b")
        replaced = base.replace_stage("b", new_b)
        assert replaced.stage_names == ("c", "a", "b")
        assert replaced.entries[2].depends_on == ("a",)
        response = await replaced.execute()
        assert response.ok
        assert_stage_order(response, ["a", "b", "c"])
        assert new_b.call_count == 1

    @fake_clock
    async def test_keeps_retry_policy(self) -> None:
        """The replacement is retried with the policy given to the original."""
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=5, jitter=0)
        base = pk.Pipeline("p").add_stage(MockStage("flaky"), retry=policy)
        flaky = MockStage("flaky", output="done", fail_times=2)
        with capture_events() as events:
            response = await base.replace_stage("flaky", flaky).execute()
        assert response.ok
        assert response.stages["flaky"].attempts == 3
        assert [e.delay for e in events.of(pk.StageRetrying)] == [5.0, 10.0]
        assert [call.time for call in flaky.calls] == [0, 5, 15]

    def test_unknown_name_rejected(self) -> None:
        """Replacing a stage that does not exist raises, naming it."""
        with pytest.raises(pk.PipelineDefinitionError, match="'missing'"):
            pk.Pipeline("p").add_stage(MockStage("a")).replace_stage("missing", MockStage("missing"))

    def test_different_name_rejected(self) -> None:
        """The replacement must have the same name as the stage it replaces."""
        with pytest.raises(pk.PipelineDefinitionError, match=r"'a'.*'b'"):
            pk.Pipeline("p").add_stage(MockStage("a")).replace_stage("a", MockStage("b"))


class TestAtomicPipeline:
    """AtomicPipeline always rolls back."""

    def test_with_rollback_false_rejected(self) -> None:
        """Switching rollback off on an atomic pipeline raises PipelineDefinitionError."""
        with pytest.raises(pk.PipelineDefinitionError, match="atomic"):
            pk.AtomicPipeline("tx").with_rollback(False)

    def test_with_rollback_true_sets_timeout(self) -> None:
        """with_rollback(True, timeout=...) is allowed and keeps rollback on."""
        pipeline = pk.AtomicPipeline("tx").with_rollback(True, timeout=5)
        assert isinstance(pipeline, pk.AtomicPipeline)
        assert (pipeline.rollback_enabled, pipeline.rollback_timeout) == (True, 5.0)

    def test_builders_keep_the_class(self) -> None:
        """Builder methods on an atomic pipeline return atomic pipelines."""
        pipeline = (
            pk.AtomicPipeline("tx")
            .add_stage(MockStage("a"))
            .add_parallel_stages(MockStage("b"), MockStage("c"))
            .with_retry(pk.RetryPolicy())
            .with_timeout(3)
        )
        assert type(pipeline) is pk.AtomicPipeline
        assert pipeline.timeout == 3.0


class TestWorkflowPipeline:
    """WorkflowPipeline applies its timeout and retry to each stage."""

    def test_with_timeout_is_per_stage(self) -> None:
        """with_timeout sets the per-stage timeout, not a whole-run timeout."""
        pipeline = pk.WorkflowPipeline("wf").add_stage(MockStage("a")).with_timeout(2)
        assert type(pipeline) is pk.WorkflowPipeline
        assert pipeline.stage_timeout == 2.0
        assert pipeline.timeout is None

    def test_bad_stage_timeout_rejected(self) -> None:
        """The workflow's per-stage timeout must be positive."""
        with pytest.raises(pk.PipelineDefinitionError, match="timeout"):
            pk.WorkflowPipeline("wf").with_timeout(0)

    @fake_clock
    async def test_slow_stage_times_out_as_a_stage(self) -> None:
        """A stage exceeding the workflow timeout fails with StageTimeoutError, not PipelineTimeoutError."""
        fast, slow = MockStage("fast", output=1, delay=10), MockStage("slow", delay=HOUR)
        pipeline = pk.WorkflowPipeline("wf").add_stage(fast).add_stage(slow).with_timeout(30)
        response = await pipeline.execute()
        assert response.stages["fast"].status is pk.Status.ROLLED_BACK  # it succeeded, then was compensated
        assert_rolled_back(response, ["fast"])
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert not isinstance(response.error, pk.PipelineTimeoutError)
        assert response.error.stage == "slow"
        assert response.error.timeout == 30
        assert response.duration == 40  # slow got its own 30 s, after fast's 10 s

    @fake_clock
    async def test_each_stage_gets_its_own_budget(self) -> None:
        """Stages that each fit the per-stage timeout pass even when together they exceed it."""
        pipeline = (
            pk.WorkflowPipeline("wf")
            .add_stage(MockStage("one", output="one", delay=20))
            .add_stage(MockStage("two", output="two", delay=20))
            .add_stage(MockStage("three", output="three", delay=20))
            .with_timeout(30)
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert dict(response.outputs) == {"one": "one", "two": "two", "three": "three"}
        assert response.duration == 60

    @fake_clock
    async def test_stage_timeout_overrides_workflow_timeout(self) -> None:
        """A stage's own timeout takes precedence over the workflow's."""
        patient = MockStage("patient", output="done", delay=20)
        pipeline = pk.WorkflowPipeline("wf").add_stage(patient, timeout=60).with_timeout(10)
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert response.duration == 20

    @fake_clock
    async def test_with_retry_applies_to_each_stage(self) -> None:
        """The workflow's retry policy retries every stage that has none of its own."""
        a, b = MockStage("a", output=2, fail_times=1), MockStage("b", output=2, fail_times=1)
        pipeline = (
            pk.WorkflowPipeline("wf").add_stage(a).add_stage(b).with_retry(pk.RetryPolicy(max_attempts=2, jitter=0))
        )
        with capture_events() as events:
            response = await pipeline.execute()
        assert response.ok
        assert [r.attempts for r in response.stages.values()] == [2, 2]
        assert [(e.stage, e.delay) for e in events.of(pk.StageRetrying)] == [("a", 1.0), ("b", 1.0)]
        assert [[call.time for call in m.calls] for m in (a, b)] == [[0, 1], [1, 2]]

    @fake_clock
    async def test_request_timeout_bounds_whole_workflow(self) -> None:
        """RequestOptions(timeout=...) still bounds a workflow's whole run."""
        pipeline = pk.WorkflowPipeline("wf").add_stage(MockStage("slow", delay=HOUR)).with_timeout(30)
        request = pk.PipelineRequest(options=pk.RequestOptions(timeout=10))
        response = await pipeline.execute(request)
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.duration == 10


class TestNesting:
    """A pipeline is itself a stage."""

    def test_nested_pipeline_is_one_stage(self) -> None:
        """Adding a pipeline adds one stage named after it."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).add_stage(MockStage("y"))
        outer = pk.Pipeline("outer").add_stage(MockStage("a")).add_stage(inner)
        assert outer.stage_names == ("a", "inner")
        assert isinstance(inner, pk.Stage)

    def test_broken_inner_pipeline_rejected_when_added(self) -> None:
        """An inner pipeline with an unknown dependency is rejected where it is nested."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"), depends_on=("ghost",))
        with pytest.raises(pk.PipelineDefinitionError, match="'ghost'"):
            pk.Pipeline("outer").add_stage(inner)

    async def test_nested_outputs(self) -> None:
        """The nested stage's output is the inner pipeline's outputs."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x", output=1)).add_stage(MockStage("y", output=2))
        outer = pk.Pipeline("outer").add_stage(MockStage("a", output=0)).add_stage(inner)
        response = await outer.execute()
        assert response.ok
        assert response.outputs["inner"] == {"x": 1, "y": 2}
        assert list(response.stages) == ["a", "inner"]

    async def test_inner_stages_see_outer_context(self) -> None:
        """Inner stages read earlier outer outputs and values; later outer stages read inner values."""
        key = pk.Key[int]("n")

        @pk.stage
        async def seed(ctx: pk.StageContext) -> int:
            ctx[key] = 10
            return 1

        @pk.stage
        async def double(ctx: pk.StageContext) -> int:
            ctx[key] = ctx[key] * 2
            return int(ctx.outputs["seed"]) + 1

        @pk.stage
        async def report(ctx: pk.StageContext) -> int:
            return ctx[key]

        inner = pk.Pipeline("inner").add_stage(double)
        outer = pk.Pipeline("outer").add_stage(seed).add_stage(inner).add_stage(report)
        response = await outer.execute()
        assert response.ok, response.summary()
        assert response.outputs["inner"] == {"double": 2}
        assert response.outputs["report"] == 20

    async def test_inner_pipeline_reusable(self) -> None:
        """One inner pipeline value can be nested in several pipelines and still run alone."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x", output="x"))
        first = pk.Pipeline("first").add_stage(inner)
        second = pk.Pipeline("second").add_stage(MockStage("a")).add_stage(inner)
        assert (await first.execute()).outputs["inner"] == {"x": "x"}
        assert (await second.execute()).outputs["inner"] == {"x": "x"}
        assert dict((await inner.execute()).outputs) == {"x": "x"}

    def test_same_inner_pipeline_twice_rejected(self) -> None:
        """Nesting one pipeline twice in the same parent is a duplicate name."""
        inner = pk.Pipeline("inner").add_stage(MockStage("x"))
        with pytest.raises(pk.PipelineDefinitionError, match="'inner'"):
            pk.Pipeline("outer").add_stage(inner).add_stage(inner)


class TestBuildMistakes:
    """Common mistakes are refused where they are made, with a message saying what to do."""

    def test_stage_class_instead_of_instance(self) -> None:
        """Adding the class of a stage asks for an instance."""

        class Migrate(pk.BaseStage):
            name = "migrate"

            async def execute(self, ctx: pk.StageContext) -> None: ...

        with pytest.raises(pk.PipelineDefinitionError, match=r"Migrate\(\) rather than Migrate"):
            pk.Pipeline("p").add_stage(Migrate)  # type: ignore[arg-type]

    def test_sync_function_as_stage(self) -> None:
        """@pk.stage on a plain function fails at decoration time."""

        def not_async(ctx: pk.StageContext) -> int:
            return 1

        with pytest.raises(TypeError, match=r"needs an async function \(async def ...\), got '.*not_async'"):
            pk.stage(not_async)  # type: ignore[arg-type]

    def test_sync_rollback(self) -> None:
        """A synchronous rollback= is refused too."""

        async def work(ctx: pk.StageContext) -> None: ...

        def undo(ctx: pk.StageContext) -> None: ...

        with pytest.raises(TypeError, match="rollback= needs an async function"):
            pk.stage(rollback=undo)(work)  # type: ignore[arg-type]

    def test_parallel_group_depending_on_its_member(self) -> None:
        """A group cannot depend on one of its own members."""

        async def work(ctx: pk.StageContext) -> None: ...

        x, y = pk.stage(name="x")(work), pk.stage(name="y")(work)
        with pytest.raises(pk.PipelineDefinitionError, match="cannot depend on its own member 'x'"):
            pk.Pipeline("p").add_parallel_stages(x, y, depends_on=("x",))

    def test_constructor_options_are_checked(self) -> None:
        """Options given to the constructor get the same checks as the builder methods."""
        with pytest.raises(pk.PipelineDefinitionError, match="timeout must be a number of seconds > 0"):
            pk.Pipeline("p", timeout=-1)
        with pytest.raises(pk.PipelineDefinitionError, match="rollback_timeout"):
            pk.Pipeline("p", rollback_timeout=0)
        with pytest.raises(pk.PipelineDefinitionError, match="hooks must be async callables"):
            pk.Pipeline("p", hooks=[42])  # type: ignore[list-item]
        with pytest.raises(pk.PipelineDefinitionError, match="always rolls back"):
            pk.AtomicPipeline("atom", rollback_enabled=False)

    def test_constructor_hooks_become_a_tuple(self) -> None:
        """Hooks passed as a list are frozen into a tuple, so the pipeline stays immutable."""

        async def hook(event: pk.Event) -> None: ...

        hooks = [hook]
        pipeline = pk.Pipeline("p", hooks=hooks)
        hooks.append(hook)
        assert pipeline.hooks == (hook,)

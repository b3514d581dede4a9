"""Executing pipelines: ordering, concurrency, skipping, failures, timeouts, dry runs and responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_rolled_back, assert_stage_order, assert_status, capture_events

StageFn = Callable[[pk.StageContext], Awaitable[Any]]

#: Run the test on the fake clock (pipekit.testing), on the backends conftest's ``anyio_backend`` uses.
fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])

#: How long a "hanging" mock stage takes: far beyond every timeout here (virtual time, on the fake clock).
HOUR = 3600.0


def named(name: str, fn: StageFn) -> pk.FunctionStage:
    """Make ``fn`` a stage called ``name``."""
    return pk.stage(name=name)(fn)


class Gauge:
    """Counts stages in flight and remembers the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def stage(self, name: str) -> pk.FunctionStage:
        """A stage that stays in flight for a few scheduler rounds."""

        async def execute(ctx: pk.StageContext) -> str:
            self.current += 1
            self.peak = max(self.peak, self.current)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            self.current -= 1
            return ctx.stage

        return named(name, execute)


def journal(*stages: MockStage) -> list[str]:
    """Every validate and execute of ``stages``, in the order they happened (by `Call.sequence`).

    A mock's ``validations`` and ``calls`` are separate lists, and a validate and an execute (of one
    stage or of two) can happen at the same instant, so only the calls' sequence numbers order them.
    """
    seen = [(c.sequence, f"validate {c.stage} dry_run={c.dry_run}") for s in stages for c in s.validations]
    seen += [(c.sequence, f"execute {c.stage}") for s in stages for c in s.calls]
    return [entry for _, entry in sorted(seen)]


def timeout_request(seconds: float) -> pk.PipelineRequest:
    """A request bounded by ``seconds``."""
    return pk.PipelineRequest(options=pk.RequestOptions(timeout=seconds))


DRY_RUN = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))


class TestSequential:
    """Stages added one after another run in order and pass outputs along."""

    async def test_order(self) -> None:
        """Stages run in the order they were added, each after the previous one finished."""
        a, b, c = MockStage("a", output=1), MockStage("b", output=2), MockStage("c")
        response = await pk.Pipeline("p").add_stage(a).add_stage(b).add_stage(c).execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert_stage_order(response, ["a", "b", "c"])
        assert [dict(call.outputs) for m in (a, b, c) for call in m.calls] == [{}, {"a": 1}, {"a": 1, "b": 2}]

    async def test_output_passing(self) -> None:
        """Each stage reads the previous stage's output from ctx.outputs."""

        async def one(ctx: pk.StageContext) -> int:
            return int(ctx.input["start"])

        async def plus(ctx: pk.StageContext) -> int:
            previous = {"b": "a", "c": "b"}[ctx.stage]
            return int(ctx.outputs[previous]) + 1

        pipeline = pk.Pipeline("p").add_stage(named("a", one)).add_stage(named("b", plus)).add_stage(named("c", plus))
        response = await pipeline.execute(input={"start": 10})
        assert dict(response.outputs) == {"a": 10, "b": 11, "c": 12}

    @fake_clock
    async def test_each_stage_waits_for_the_previous(self) -> None:
        """A stage does not start before the previous one has finished."""
        slow, after = MockStage("slow", output="done", delay=10), MockStage("next")
        response = await pk.Pipeline("p").add_stage(slow).add_stage(after).execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert [call.time for call in slow.calls] == [0]
        assert [(call.time, dict(call.outputs)) for call in after.calls] == [(10, {"slow": "done"})]

    async def test_empty_pipeline_succeeds(self) -> None:
        """A pipeline without stages succeeds with no outputs."""
        response = await pk.Pipeline("empty").execute()
        assert response.ok
        assert dict(response.outputs) == {}
        assert dict(response.stages) == {}


class TestParallel:
    """add_parallel_stages runs a group concurrently, up to its limit."""

    async def test_unlimited_group_runs_all_at_once(self) -> None:
        """Without a limit every stage of the group is in flight at once."""
        gauge = Gauge()
        pipeline = pk.Pipeline("p").add_parallel_stages(*(gauge.stage(f"s{i}") for i in range(6)))
        response = await pipeline.execute()
        assert response.ok
        assert gauge.peak == 6

    @pytest.mark.parametrize("limit", [1, 2, 3])
    async def test_limit_caps_concurrency(self, limit: int) -> None:
        """With limit=N at most N stages of the group are in flight, and N are reached."""
        gauge = Gauge()
        pipeline = pk.Pipeline("p").add_parallel_stages(*(gauge.stage(f"s{i}") for i in range(6)), limit=limit)
        response = await pipeline.execute()
        assert response.ok
        assert gauge.peak == limit
        assert len(response.outputs) == 6

    async def test_limit_applies_per_group(self) -> None:
        """Two groups each get their own limit."""
        first, second = Gauge(), Gauge()
        pipeline = (
            pk.Pipeline("p")
            .add_parallel_stages(*(first.stage(f"a{i}") for i in range(4)), limit=2)
            .add_parallel_stages(*(second.stage(f"b{i}") for i in range(4)), limit=3)
        )
        assert (await pipeline.execute()).ok
        assert (first.peak, second.peak) == (2, 3)

    async def test_next_stage_waits_for_whole_group(self) -> None:
        """The stage after a group starts only once every group member finished."""
        gauge = Gauge()
        after = MockStage("after")
        pipeline = pk.Pipeline("p").add_parallel_stages(*(gauge.stage(f"s{i}") for i in range(3))).add_stage(after)
        response = await pipeline.execute()
        assert response.ok, response.summary()
        # Every member's output is there when "after" starts: each had finished (so none was in flight).
        assert [dict(call.outputs) for call in after.calls] == [{"s0": "s0", "s1": "s1", "s2": "s2"}]

    async def test_group_waits_for_previous_stage(self) -> None:
        """A group added after a stage starts only after it."""
        first, x, y = MockStage("first", output=1), MockStage("x"), MockStage("y")
        response = await pk.Pipeline("p").add_stage(first).add_parallel_stages(x, y).execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert response.stages["first"].start_index == 0
        assert [call.outputs.get("first") for call in (*x.calls, *y.calls)] == [1, 1]  # "first" had finished


class TestDag:
    """depends_on builds a graph; independent stages run concurrently."""

    async def test_diamond_order(self) -> None:
        """In a diamond a -> (b, c) -> d, a runs first and d last, seeing both branches."""
        a, b, c, d = MockStage("a", output=0), MockStage("b", output=1), MockStage("c", output=2), MockStage("d")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(a)
            .add_stage(b, depends_on=("a",))
            .add_stage(c, depends_on=("a",))
            .add_stage(d, depends_on=("b", "c"))
        )
        response = await pipeline.execute()
        assert response.ok
        assert (response.stages["a"].start_index, response.stages["d"].start_index) == (0, 3)
        assert [call.outputs.get("a") for call in (*b.calls, *c.calls)] == [0, 0]  # "a" had finished
        assert [dict(call.outputs) for call in d.calls] == [{"a": 0, "b": 1, "c": 2}]

    async def test_diamond_branches_run_concurrently(self) -> None:
        """The two branches of a diamond are in flight at the same time."""
        gauge = Gauge()
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_stage(gauge.stage("b"), depends_on=("a",))
            .add_stage(gauge.stage("c"), depends_on=("a",))
            .add_stage(MockStage("d"), depends_on=("b", "c"))
        )
        assert (await pipeline.execute()).ok
        assert gauge.peak == 2

    async def test_independent_roots_run_concurrently(self) -> None:
        """Two roots (depends_on=()) each wait for the other to start: only concurrency lets both finish."""
        x_started, y_started = anyio.Event(), anyio.Event()

        async def x(ctx: pk.StageContext) -> None:
            x_started.set()
            await y_started.wait()

        async def y(ctx: pk.StageContext) -> None:
            y_started.set()
            await x_started.wait()

        pipeline = pk.Pipeline("p").add_stage(named("x", x), depends_on=()).add_stage(named("y", y), depends_on=())
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.ok

    @fake_clock
    async def test_stage_waits_only_for_its_dependencies(self) -> None:
        """A stage depending on one root runs while an unrelated root is still busy."""
        busy, quick, child = MockStage("busy", delay=10), MockStage("quick"), MockStage("child")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(busy, depends_on=())
            .add_stage(quick, depends_on=())
            .add_stage(child, depends_on=("quick",))
        )
        response = await pipeline.execute()
        assert response.ok
        assert [call.time for call in busy.calls] == [0]
        assert [(call.time, dict(call.outputs)) for call in child.calls] == [(0, {"quick": None})]
        assert response.duration == 10

    async def test_stage_results_in_definition_order(self) -> None:
        """response.stages lists stages in the order they were added, whatever order they ran in."""
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("late"), depends_on=("early",))
            .add_stage(MockStage("early"), depends_on=())
        )
        response = await pipeline.execute()
        assert_stage_order(response, ["early", "late"])
        assert list(response.stages) == ["late", "early"]


class TestConditional:
    """add_conditional_stage runs a stage only when its condition holds."""

    async def test_false_condition_skips(self) -> None:
        """A false condition records SKIPPED with a reason and never executes the stage."""
        maybe = MockStage("maybe", output="out")
        response = await pk.Pipeline("p").add_conditional_stage(maybe, lambda ctx: False).execute()
        assert response.ok
        assert (maybe.calls, maybe.validations) == ([], [])
        result = response.stages["maybe"]
        assert result.status is pk.Status.SKIPPED
        assert result.reason is not None
        assert "condition" in result.reason
        assert result.attempts == 0
        assert result.output is None
        assert "maybe" not in response.outputs

    async def test_dependents_of_skipped_stage_run(self) -> None:
        """Stages after a skipped conditional stage still run."""
        maybe = MockStage("maybe")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("a"))
            .add_conditional_stage(maybe, lambda ctx: False)
            .add_stage(MockStage("after"))
        )
        response = await pipeline.execute()
        assert response.ok
        assert_stage_order(response, ["a", "after"])
        assert maybe.calls == []
        assert response.stages["after"].status is pk.Status.SUCCEEDED

    async def test_condition_sees_earlier_outputs_and_input(self) -> None:
        """The condition is given the context, with earlier outputs and the input."""
        seen: list[tuple[Any, Any]] = []

        def when(ctx: pk.StageContext) -> bool:
            seen.append((dict(ctx.outputs), ctx.input.get("go")))
            return bool(ctx.outputs["a"] == 1 and ctx.input["go"])

        pipeline = pk.Pipeline("p").add_stage(MockStage("a", output=1)).add_conditional_stage(MockStage("b"), when)
        response = await pipeline.execute(input={"go": True})
        assert response.ok
        assert_stage_order(response, ["a", "b"])
        assert seen == [({"a": 1}, True)]

    async def test_true_condition_runs(self) -> None:
        """A true condition runs the stage normally."""
        maybe = MockStage("maybe", output=5)
        response = await pk.Pipeline("p").add_conditional_stage(maybe, lambda ctx: True).execute()
        assert response.stages["maybe"].status is pk.Status.SUCCEEDED
        assert response.outputs["maybe"] == 5
        assert maybe.call_count == 1

    async def test_raising_condition_fails_the_stage(self) -> None:
        """A condition that raises fails the stage with that error."""
        boom = RuntimeError("bad condition")

        def when(ctx: pk.StageContext) -> bool:
            raise boom

        maybe = MockStage("maybe")
        response = await pk.Pipeline("p").add_conditional_stage(maybe, when).execute()
        assert maybe.calls == []
        assert_status(response, pk.Status.FAILED)
        assert response.stages["maybe"].error is boom
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.__cause__ is boom


class TestContinueOnError:
    """continue_on_error records a failure and lets the run go on."""

    async def test_failure_recorded_and_run_succeeds(self) -> None:
        """The failed stage is FAILED, its dependents SKIPPED naming it, others run; the run SUCCEEDED."""
        boom = RuntimeError("optional step broke")
        needs_it, needs_that, independent = MockStage("needs_it"), MockStage("needs_that"), MockStage("independent")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("optional", error=boom), continue_on_error=True)
            .add_stage(needs_it)
            .add_stage(needs_that)
            .add_stage(independent, depends_on=())
        )
        response = await pipeline.execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert response.ok
        assert response.error is None
        assert response.stages["optional"].status is pk.Status.FAILED
        assert response.stages["optional"].error is boom
        dependent = response.stages["needs_it"]
        assert dependent.status is pk.Status.SKIPPED
        assert dependent.reason is not None
        assert "'optional'" in dependent.reason
        assert "failed" in dependent.reason
        transitive = response.stages["needs_that"]
        assert transitive.status is pk.Status.SKIPPED
        assert transitive.reason is not None
        assert "'needs_it'" in transitive.reason
        assert [m.call_count for m in (needs_it, needs_that, independent)] == [0, 0, 1]

    @fake_clock
    async def test_other_branches_keep_running(self) -> None:
        """A failure on one branch does not stop a concurrent branch that is still running."""
        good = MockStage("good", output=1, delay=2)
        bad = MockStage("bad", error=ValueError("x"), delay=1)
        after_good = MockStage("after_good")
        pipeline = (
            pk.Pipeline("p")
            .add_parallel_stages(good, bad, continue_on_error=True)
            .add_stage(after_good, depends_on=("good",))
        )
        response = await pipeline.execute()
        assert response.ok
        assert response.stages["bad"].status is pk.Status.FAILED
        assert response.stages["bad"].duration == 1  # failed at t=1, while "good" (started at 0) ran until 2
        assert [call.time for call in good.calls] == [0]
        assert [call.time for call in after_good.calls] == [2]
        assert response.outputs == {"good": 1, "after_good": None}

    async def test_stage_after_group_with_failure_skipped(self) -> None:
        """A stage after a group in which one continue_on_error stage failed is skipped."""
        good, after = MockStage("good"), MockStage("after")
        pipeline = (
            pk.Pipeline("p")
            .add_parallel_stages(MockStage("bad", error=ValueError("x")), good, continue_on_error=True)
            .add_stage(after)
        )
        response = await pipeline.execute()
        assert response.stages["after"].status is pk.Status.SKIPPED
        assert "'bad'" in (response.stages["after"].reason or "")
        assert (good.call_count, after.call_count) == (1, 0)


class TestFailFast:
    """By default the first failure stops the run."""

    @fake_clock
    async def test_failure_cancels_in_flight_siblings(self) -> None:
        """A failing stage cancels a running sibling (CANCELLED); later stages are SKIPPED with a reason."""
        sibling, later = MockStage("sibling", delay=HOUR), MockStage("later")
        pipeline = (
            pk.Pipeline("p")
            .add_parallel_stages(MockStage("bad", error=RuntimeError("boom"), delay=1), sibling)
            .add_stage(later)
        )
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "bad"
        assert response.stages["bad"].status is pk.Status.FAILED
        assert [call.time for call in sibling.calls] == [0]  # in flight when "bad" failed at t=1
        result = response.stages["sibling"]
        assert result.status is pk.Status.CANCELLED
        assert "'bad'" in (result.reason or "")
        assert result.duration == 1
        skipped = response.stages["later"]
        assert skipped.status is pk.Status.SKIPPED
        assert skipped.reason is not None
        assert "not started" in skipped.reason
        assert "'bad'" in skipped.reason
        assert skipped.attempts == 0
        assert later.calls == []
        assert response.duration == 1

    @fake_clock
    async def test_failure_cancels_other_branch(self) -> None:
        """A failure in one DAG branch cancels a running independent branch."""
        slow = MockStage("slow", delay=HOUR)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(slow, depends_on=())
            .add_stage(MockStage("bad", error=ValueError("nope"), delay=1), depends_on=())
        )
        response = await pipeline.execute()
        assert response.stages["slow"].status is pk.Status.CANCELLED
        assert response.stages["bad"].status is pk.Status.FAILED
        assert [call.time for call in slow.calls] == [0]
        assert response.duration == 1

    async def test_sequential_failure_skips_rest(self) -> None:
        """After a failure in a chain no later stage runs (the stage before it is compensated)."""
        a, c = MockStage("a", output=1), MockStage("c")
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(MockStage("b", error=KeyError("k"))).add_stage(c)
        response = await pipeline.execute()
        assert (a.call_count, c.call_count) == (1, 0)
        assert [r.status for r in response.stages.values()] == [
            pk.Status.ROLLED_BACK,
            pk.Status.FAILED,
            pk.Status.SKIPPED,
        ]
        assert_rolled_back(response, ["a"])
        assert response.outputs == {"a": 1}


class TestStageTimeout:
    """A stage's timeout bounds each attempt."""

    @fake_clock
    async def test_attempt_timeout(self) -> None:
        """An attempt running past its timeout fails the stage as TIMED_OUT with StageTimeoutError."""
        after = MockStage("after")
        pipeline = pk.Pipeline("p").add_stage(MockStage("slow", delay=HOUR), timeout=30).add_stage(after)
        response = await pipeline.execute()
        result = response.stages["slow"]
        assert result.status is pk.Status.TIMED_OUT
        assert isinstance(result.error, pk.StageTimeoutError)
        assert result.duration == 30
        assert_status(response, pk.Status.TIMED_OUT)
        error = response.error
        assert isinstance(error, pk.StageTimeoutError)
        assert isinstance(error, pk.StageFailedError)
        assert isinstance(error, TimeoutError)
        assert (error.stage, error.timeout, error.attempts) == ("slow", 30, 1)
        assert "'slow'" in str(error)
        assert response.stages["after"].status is pk.Status.SKIPPED
        assert after.calls == []
        assert response.duration == 30

    @fake_clock
    async def test_fast_stage_within_timeout(self) -> None:
        """A stage finishing within its timeout succeeds."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("fast", delay=4), timeout=5)
        response = await pipeline.execute()
        assert response.ok
        assert response.duration == 4

    @fake_clock
    async def test_raise_for_status_raises_stage_timeout(self) -> None:
        """raise_for_status raises the StageTimeoutError, never a bare TimeoutError."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("slow", delay=HOUR), timeout=30)
        response = await pipeline.execute()
        with pytest.raises(pk.StageTimeoutError) as info:
            response.raise_for_status()
        assert type(info.value) is pk.StageTimeoutError

    @fake_clock
    async def test_timeout_with_continue_on_error(self) -> None:
        """A timed-out continue_on_error stage is recorded and the run goes on."""
        other = MockStage("other")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("slow", delay=HOUR), timeout=30, continue_on_error=True)
            .add_stage(other, depends_on=())
        )
        response = await pipeline.execute()
        assert response.ok
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        assert other.call_count == 1
        assert response.duration == 30


class TestRunTimeout:
    """The pipeline timeout and the request timeout bound the whole run; the tighter wins."""

    @fake_clock
    async def test_pipeline_timeout(self) -> None:
        """with_timeout ends an overlong run: TIMED_OUT with PipelineTimeoutError."""
        request = pk.PipelineRequest(id="r-9")
        after = MockStage("after")
        pipeline = pk.Pipeline("slowpoke").add_stage(MockStage("slow", delay=HOUR)).add_stage(after)
        response = await pipeline.with_timeout(30).execute(request)
        assert_status(response, pk.Status.TIMED_OUT)
        error = response.error
        assert isinstance(error, pk.PipelineTimeoutError)
        assert isinstance(error, TimeoutError)
        assert (error.pipeline, error.timeout, error.request_id) == ("slowpoke", 30, "r-9")
        assert response.stages["slow"].status is pk.Status.TIMED_OUT
        skipped = response.stages["after"]
        assert skipped.status is pk.Status.SKIPPED
        assert "timed out" in (skipped.reason or "")
        assert after.calls == []
        assert response.duration == 30

    @fake_clock
    async def test_request_timeout(self) -> None:
        """RequestOptions(timeout=...) ends an overlong run the same way."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("slow", delay=HOUR))
        response = await pipeline.execute(timeout_request(30))
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.error.timeout == 30
        assert response.duration == 30

    @fake_clock
    @pytest.mark.parametrize(("pipeline_timeout", "request_timeout"), [(30, 600), (600, 30)])
    async def test_tighter_timeout_wins(self, pipeline_timeout: float, request_timeout: float) -> None:
        """Whichever of the pipeline and request timeouts is tighter bounds the run."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("slow", delay=HOUR)).with_timeout(pipeline_timeout)
        response = await pipeline.execute(timeout_request(request_timeout))
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.error.timeout == 30
        assert response.duration == 30

    @fake_clock
    async def test_run_timeout_interrupts_parallel_stages(self) -> None:
        """Every running stage is interrupted when the run times out."""
        a, b = MockStage("a", delay=HOUR), MockStage("b", delay=HOUR)
        response = await pk.Pipeline("p").add_parallel_stages(a, b).with_timeout(30).execute()
        assert [r.status for r in response.stages.values()] == [pk.Status.TIMED_OUT, pk.Status.TIMED_OUT]
        assert [call.time for call in (*a.calls, *b.calls)] == [0, 0]
        assert response.duration == 30

    @fake_clock
    async def test_run_within_timeout_succeeds(self) -> None:
        """A run finishing within its timeouts succeeds."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a", delay=4)).with_timeout(5)
        response = await pipeline.execute(timeout_request(5))
        assert response.ok
        assert response.duration == 4

    @pytest.mark.parametrize("seconds", [0, -1])
    def test_bad_request_timeout_rejected(self, seconds: float) -> None:
        """A request timeout must be positive."""
        with pytest.raises(ValueError, match="timeout"):
            pk.RequestOptions(timeout=seconds)


class TestDryRun:
    """A dry run validates every stage, executes none, and reports all problems at once."""

    async def test_nothing_executes_and_every_stage_validated(self) -> None:
        """Every validate is called with ctx.dry_run true; no execute runs; the run succeeds."""
        a, b, c, d = (MockStage(name, output=name) for name in "abcd")
        pipeline = pk.Pipeline("p").add_stage(a).add_parallel_stages(b, c).add_conditional_stage(d, lambda ctx: False)
        response = await pipeline.execute(DRY_RUN)
        assert response.ok
        assert [[call.dry_run for call in m.validations] for m in (a, b, c, d)] == [[True]] * 4
        assert [m.calls for m in (a, b, c, d)] == [[]] * 4
        assert dict(response.outputs) == {}
        assert all(r.status is not pk.Status.SUCCEEDED for r in response.stages.values())
        assert all(r.attempts == 0 for r in response.stages.values())

    async def test_all_problems_reported_at_once(self) -> None:
        """Every failing validate is reported in one ValidationError with .errors."""
        stages = [
            MockStage("a", validate_error="a needs a token"),
            MockStage("b"),
            MockStage("c", validate_error="c needs a region"),
        ]
        pipeline = pk.Pipeline("p").add_stage(stages[0]).add_stage(stages[1]).add_stage(stages[2])
        response = await pipeline.execute(DRY_RUN)
        assert not response.ok
        assert_status(response, pk.Status.FAILED)
        error = response.error
        assert isinstance(error, pk.ValidationError)
        assert len(error.errors) == 2
        assert [e.stage for e in error.errors] == ["a", "c"]
        assert "a needs a token" in str(error)
        assert "c needs a region" in str(error)
        assert [(len(m.validations), m.call_count) for m in stages] == [(1, 0)] * 3
        assert response.stages["a"].status is pk.Status.FAILED
        assert response.stages["c"].status is pk.Status.FAILED
        assert response.stages["b"].status is not pk.Status.FAILED
        with pytest.raises(pk.ValidationError):
            response.raise_for_status()

    async def test_unexpected_validate_error_reported(self) -> None:
        """A validate raising something other than ValidationError is reported as a problem too."""
        broken = MockStage("broken", validate_error=LookupError("config missing"))
        pipeline = pk.Pipeline("p").add_stage(broken).add_stage(MockStage("other", validate_error="other is wrong"))
        response = await pipeline.execute(DRY_RUN)
        assert isinstance(response.error, pk.ValidationError)
        assert len(response.error.errors) == 2
        assert "config missing" in str(response.error)

    async def test_nested_pipeline_problems_included(self) -> None:
        """Problems inside a nested pipeline are reported individually in the outer dry run."""
        x, y = MockStage("x", validate_error="x broken"), MockStage("y", validate_error="y broken")
        a = MockStage("a", validate_error="a broken")
        inner = pk.Pipeline("inner").add_stage(x).add_stage(y)
        outer = pk.Pipeline("outer").add_stage(a).add_stage(inner)
        response = await outer.execute(DRY_RUN)
        assert isinstance(response.error, pk.ValidationError)
        assert len(response.error.errors) == 3
        assert [m.calls for m in (x, y, a)] == [[]] * 3

    async def test_dry_run_reports_definition_problems_with_the_rest(self) -> None:
        """A broken definition is one more problem in the dry run's report; every stage is still validated."""
        a, b = MockStage("a", output="a"), MockStage("b", output="b", validate_error="no credentials")
        pipeline = pk.Pipeline("p").add_stage(a, depends_on=("missing",)).add_stage(b)
        response = await pipeline.execute(DRY_RUN)
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.ValidationError)
        messages = [str(e) for e in response.error.errors]
        assert messages == ["pipeline 'p': stage 'a' depends on unknown stage 'missing'", "stage 'b': no credentials"]
        assert isinstance(response.error.errors[0].__cause__, pk.PipelineDefinitionError)
        assert journal(a, b) == ["validate a dry_run=True", "validate b dry_run=True"]

    async def test_broken_definition_still_raises_outside_dry_runs(self) -> None:
        """Outside a dry run, a broken definition raises before anything runs."""
        a = MockStage("a")
        pipeline = pk.Pipeline("p").add_stage(a, depends_on=("missing",))
        with pytest.raises(pk.PipelineDefinitionError, match="'missing'"):
            await pipeline.execute()
        assert (a.validations, a.calls) == ([], [])


class TestValidate:
    """In normal runs validate is called right before execute."""

    async def test_validate_before_execute(self) -> None:
        """Each stage is validated just before it executes, with ctx.dry_run false."""
        a, b = MockStage("a", output="a"), MockStage("b", output="b")
        pipeline = pk.Pipeline("p").add_stage(a).add_stage(b)
        response = await pipeline.execute()
        assert response.ok
        assert journal(a, b) == ["validate a dry_run=False", "execute a", "validate b dry_run=False", "execute b"]

    @fake_clock
    async def test_validation_error_fails_stage_without_retry(self) -> None:
        """A ValidationError from validate fails the stage; it is not retried and never executed."""
        stage = MockStage("a", validate_error="bad request")
        pipeline = pk.Pipeline("p").add_stage(stage, retry=pk.RetryPolicy(max_attempts=3))
        with capture_events() as events:
            response = await pipeline.execute()
        assert [call.dry_run for call in stage.validations] == [False]
        assert stage.calls == []
        assert events.of(pk.StageRetrying) == []
        assert response.duration == 0  # no back-off slept
        result = response.stages["a"]
        assert result.status is pk.Status.FAILED
        assert isinstance(result.error, pk.ValidationError)
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.__cause__ is result.error
        assert "bad request" in str(response.error)

    async def test_decorator_validate(self) -> None:
        """@pk.stage(validate=...) registers a validate function."""
        log: list[str] = []

        def check(ctx: pk.StageContext) -> None:
            log.append("validate")
            if "user" not in ctx.input:
                raise pk.ValidationError("user is required")

        @pk.stage(validate=check)
        async def greet(ctx: pk.StageContext) -> str:
            log.append("execute")
            return f"hi {ctx.input['user']}"

        pipeline = pk.Pipeline("p").add_stage(greet)
        assert (await pipeline.execute(input={"user": "ann"})).outputs["greet"] == "hi ann"
        failed = await pipeline.execute()
        assert isinstance(failed.stages["greet"].error, pk.ValidationError)
        assert log == ["validate", "execute", "validate"]


class TestResponse:
    """The fields and helpers of PipelineResponse and StageResult."""

    async def test_success_fields(self) -> None:
        """A successful run: ok, outputs, per-stage results, timestamps and duration."""
        request = pk.PipelineRequest(id="req-42", input={"x": 1})
        pipeline = pk.Pipeline("report").add_stage(MockStage("a", output="A")).add_stage(MockStage("b", output="B"))
        response = await pipeline.execute(request)
        assert response.ok
        assert response.status is pk.Status.SUCCEEDED
        assert response.error is None
        assert (response.id, response.pipeline) == ("req-42", "report")
        assert dict(response.outputs) == {"a": "A", "b": "B"}
        assert list(response.stages) == ["a", "b"]
        assert response.started_at.tzinfo is UTC
        assert response.started_at <= response.finished_at
        assert response.duration >= 0
        for name, result in response.stages.items():
            assert result.name == name
            assert result.status is pk.Status.SUCCEEDED
            assert result.attempts == 1
            assert result.error is None
            assert result.started_at is not None
            assert result.finished_at is not None
            assert response.started_at <= result.started_at <= result.finished_at <= response.finished_at
            assert result.duration >= 0
            assert (result.rolled_back, result.rollback_error) == (False, None)
        assert response.stages["b"].output == "B"
        assert response.raise_for_status() is response

    async def test_failure_fields(self) -> None:
        """A failed run: not ok, raise_for_status raises the response's error."""
        boom = ValueError("bad data")
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b", error=boom))
        response = await pipeline.execute()
        assert not response.ok
        assert_status(response, pk.Status.FAILED)
        with pytest.raises(pk.StageFailedError) as info:
            response.raise_for_status()
        assert info.value is response.error
        assert info.value.__cause__ is boom
        assert response.stages["b"].error is boom

    async def test_never_started_stage_has_no_times(self) -> None:
        """A stage that never started has no timestamps, zero attempts and zero duration."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a", error=ValueError("x"))).add_stage(MockStage("b"))
        result = (await pipeline.execute()).stages["b"]
        assert (result.started_at, result.finished_at, result.attempts, result.duration) == (None, None, 0, 0.0)

    async def test_outputs_and_stages_read_only(self) -> None:
        """The response's outputs and stages mappings cannot be changed."""
        response = await pk.Pipeline("p").add_stage(MockStage("a")).execute()
        with pytest.raises(TypeError):
            response.outputs["a"] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            del response.stages["a"]  # type: ignore[attr-defined]

    async def test_default_request_ids_unique(self) -> None:
        """Each run without an explicit request gets a fresh id."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        first, second = await pipeline.execute(), await pipeline.execute()
        assert first.id
        assert first.id != second.id

    async def test_summary(self) -> None:
        """summary() names the pipeline, its status, every stage with its status, and the error."""
        pipeline = (
            pk.Pipeline("nightly")
            .add_stage(MockStage("fetch"))
            .add_stage(MockStage("parse", error=ValueError("bad row 7")))
            .add_stage(MockStage("store"))
        )
        response = await pipeline.execute()
        summary = response.summary()
        lines = summary.splitlines()
        assert "'nightly'" in lines[0]
        assert "failed" in lines[0]
        assert response.id in lines[0]
        fetch = next(line for line in lines if "fetch" in line)
        parse = next(line for line in lines if "parse" in line)
        store = next(line for line in lines if "store" in line)
        assert "rolled_back" in fetch  # it succeeded, then was compensated
        assert "failed" in parse
        assert "bad row 7" in parse
        assert "skipped" in store
        assert "StageFailedError" in lines[-1]

    async def test_request_and_input_together_rejected(self) -> None:
        """execute() takes a request or input=, not both."""
        with pytest.raises(TypeError, match="either"):
            await pk.Pipeline("p").execute(pk.PipelineRequest(), input={"x": 1})

    async def test_non_request_rejected(self) -> None:
        """execute() rejects something that is not a PipelineRequest."""
        with pytest.raises(TypeError, match="PipelineRequest"):
            await pk.Pipeline("p").execute({"x": 1})  # type: ignore[call-overload]


class TestSyncRun:
    """pk.run runs a pipeline from synchronous code."""

    def _pipeline(self) -> pk.Pipeline:
        async def double(ctx: pk.StageContext) -> int:
            await anyio.lowlevel.checkpoint()
            return int(ctx.input["n"]) * 2

        return pk.Pipeline("sync").add_stage(named("double", double))

    def test_run_on_asyncio(self) -> None:
        """pk.run works from a plain function on asyncio."""
        response = pk.run(self._pipeline(), input={"n": 21}, backend="asyncio")
        assert response.ok
        assert response.outputs["double"] == 42

    def test_run_on_trio(self) -> None:
        """pk.run works from a plain function on trio."""
        response = pk.run(self._pipeline(), input={"n": 4}, backend="trio")
        assert response.ok
        assert response.outputs["double"] == 8

    def test_run_default_backend(self) -> None:
        """pk.run defaults to asyncio and accepts a full request."""
        response = pk.run(self._pipeline(), pk.PipelineRequest(id="sync-1", input={"n": 1}))
        assert (response.id, response.outputs["double"]) == ("sync-1", 2)

    def test_run_reports_failure_without_raising(self) -> None:
        """pk.run returns a failed response rather than raising."""
        response = pk.run(pk.Pipeline("p").add_stage(MockStage("bad", error=ValueError("x"))), backend="trio")
        assert_status(response, pk.Status.FAILED)


class TestBaseStage:
    """Class-based stages built on pk.BaseStage."""

    async def test_class_attribute_name(self) -> None:
        """A subclass with a class-level name runs and returns its output."""

        class Fetch(pk.BaseStage):
            name = "fetch"

            async def execute(self, ctx: pk.StageContext) -> dict[str, int]:
                return {"rows": 3}

        stage = Fetch()
        assert isinstance(stage, pk.Stage)
        response = await pk.Pipeline("p").add_stage(stage).execute()
        assert response.outputs["fetch"] == {"rows": 3}

    async def test_name_from_constructor(self) -> None:
        """The name may be passed to the constructor, so one class makes several stages."""

        class Echo(pk.BaseStage):
            async def execute(self, ctx: pk.StageContext) -> str:
                return self.name

        pipeline = pk.Pipeline("p").add_stage(Echo("one")).add_stage(Echo("two"))
        response = await pipeline.execute()
        assert dict(response.outputs) == {"one": "one", "two": "two"}

    async def test_rollback_override_called(self) -> None:
        """An overridden rollback runs when a later stage fails."""
        log: list[str] = []

        class Create(pk.BaseStage):
            name = "create"

            async def execute(self, ctx: pk.StageContext) -> str:
                log.append("create")
                return "id-1"

            async def rollback(self, ctx: pk.StageContext) -> None:
                log.append(f"undo {ctx.outputs['create']}")

        pipeline = pk.Pipeline("p").add_stage(Create()).add_stage(MockStage("boom", error=RuntimeError("x")))
        response = await pipeline.execute()
        assert log == ["create", "undo id-1"]
        assert response.stages["create"].status is pk.Status.ROLLED_BACK
        assert_rolled_back(response, ["create"])

    async def test_default_validate_and_rollback_are_noops(self) -> None:
        """BaseStage's own validate accepts everything and its rollback does nothing."""

        class Plain(pk.BaseStage):
            name = "plain"

            async def execute(self, ctx: pk.StageContext) -> int:
                return 1

        pipeline = pk.Pipeline("p").add_stage(Plain()).add_stage(MockStage("boom", error=RuntimeError("x")))
        response = await pipeline.execute()
        assert response.stages["plain"].status is pk.Status.SUCCEEDED
        assert not response.stages["plain"].rolled_back
        assert_rolled_back(response, [])
        assert (await pk.Pipeline("q").add_stage(Plain()).execute(DRY_RUN)).ok

    def test_execute_is_required(self) -> None:
        """A BaseStage subclass without execute cannot be instantiated."""

        class Incomplete(pk.BaseStage):
            name = "incomplete"

        with pytest.raises(TypeError):
            Incomplete()  # type: ignore[abstract]


class TestStageDecorator:
    """@pk.stage turns async functions into stages."""

    async def test_bare(self) -> None:
        """Used bare, the stage is named after the function."""

        @pk.stage
        async def load_users(ctx: pk.StageContext) -> list[str]:
            return ["ann", "bob"]

        assert isinstance(load_users, pk.FunctionStage)
        assert load_users.name == "load_users"
        response = await pk.Pipeline("p").add_stage(load_users).execute()
        assert response.outputs["load_users"] == ["ann", "bob"]

    async def test_with_name(self) -> None:
        """name= overrides the function's name."""

        @pk.stage(name="load-users")
        async def load(ctx: pk.StageContext) -> int:
            return 2

        assert load.name == "load-users"
        response = await pk.Pipeline("p").add_stage(load).execute()
        assert response.outputs["load-users"] == 2

    async def test_with_rollback(self) -> None:
        """rollback= is called with the stage's context when a later stage fails."""
        log: list[str] = []

        async def undo(ctx: pk.StageContext) -> None:
            log.append(f"undo {ctx.stage}")

        @pk.stage(name="create-user", rollback=undo)
        async def create_user(ctx: pk.StageContext) -> str:
            log.append("create")
            return "u1"

        pipeline = pk.Pipeline("p").add_stage(create_user).add_stage(MockStage("email", error=OSError("smtp down")))
        response = await pipeline.execute()
        assert log == ["create", "undo create-user"]
        assert response.stages["create-user"].status is pk.Status.ROLLED_BACK
        assert_rolled_back(response, ["create-user"])

    async def test_rollback_not_called_on_success(self) -> None:
        """rollback= is not called when the run succeeds."""
        log: list[str] = []

        async def undo(ctx: pk.StageContext) -> None:
            log.append("undo")

        @pk.stage(rollback=undo)
        async def work(ctx: pk.StageContext) -> None:
            log.append("work")

        assert (await pk.Pipeline("p").add_stage(work).execute()).ok
        assert log == ["work"]


class TestStageFailedError:
    """The error a failed stage produces."""

    @fake_clock
    async def test_attributes_and_cause(self) -> None:
        """StageFailedError has .stage, .attempts and the original exception as __cause__."""
        boom = ConnectionError("refused")
        connect = MockStage("connect", error=boom)
        policy = pk.RetryPolicy(max_attempts=2, jitter=0)
        response = await pk.Pipeline("p").add_stage(connect, retry=policy).execute()
        assert [(call.attempt, call.time) for call in connect.calls] == [(1, 0), (2, 1)]
        error = response.error
        assert isinstance(error, pk.StageFailedError)
        assert isinstance(error, pk.PipekitError)
        assert error.stage == "connect"
        assert error.attempts == 2
        assert error.__cause__ is boom
        assert "'connect'" in str(error)
        assert "2 attempts" in str(error)

    def test_message(self) -> None:
        """The generated message names the stage and the attempts."""
        assert str(pk.StageFailedError("s", attempts=1)) == "stage 's' failed after 1 attempt"
        assert str(pk.StageFailedError("s", attempts=3)) == "stage 's' failed after 3 attempts"


class TestNested:
    """A pipeline nested as a stage of another."""

    async def test_success_outputs(self) -> None:
        """The nested stage's output maps the inner stages to their outputs."""
        x, after = MockStage("x", output=1), MockStage("after", output=4)
        y, z = MockStage("y", output=2), MockStage("z", output=3)
        inner = pk.Pipeline("inner").add_stage(x).add_parallel_stages(y, z)
        outer = pk.Pipeline("outer").add_stage(MockStage("before", output=0)).add_stage(inner).add_stage(after)
        response = await outer.execute()
        assert response.ok, response.summary()
        assert response.outputs["inner"] == {"x": 1, "y": 2, "z": 3}
        assert_stage_order(response, ["before", "inner", "after"])
        assert [dict(call.outputs) for call in x.calls] == [{"before": 0}]
        assert [dict(call.outputs) for call in after.calls] == [{"before": 0, "inner": {"x": 1, "y": 2, "z": 3}}]
        assert response.stages["inner"].status is pk.Status.SUCCEEDED

    async def test_inner_sees_outer_outputs(self) -> None:
        """Inner stages read outputs of outer stages that ran before."""
        read = MockStage("read")
        inner = pk.Pipeline("inner").add_stage(read)
        outer = pk.Pipeline("outer").add_stage(MockStage("before", output="hello")).add_stage(inner)
        assert (await outer.execute()).ok
        assert [call.outputs["before"] for call in read.calls] == ["hello"]

    async def test_failure(self) -> None:
        """An inner failure fails the nested stage and the outer run; the cause chain reaches the original."""
        boom = RuntimeError("inner broke")
        x, after = MockStage("x"), MockStage("after")
        inner = pk.Pipeline("inner").add_stage(x).add_stage(MockStage("y", error=boom))
        outer = pk.Pipeline("outer").add_stage(inner).add_stage(after)
        response = await outer.execute()
        assert_status(response, pk.Status.FAILED)
        assert response.stages["inner"].status is pk.Status.FAILED
        assert response.stages["after"].status is pk.Status.SKIPPED
        assert (x.call_count, after.call_count) == (1, 0)
        error = response.error
        assert isinstance(error, pk.StageFailedError)
        assert error.stage == "inner"
        inner_error = error.__cause__
        assert isinstance(inner_error, pk.StageFailedError)
        assert inner_error.stage == "y"
        assert inner_error.__cause__ is boom

    @fake_clock
    async def test_stage_timeout_bounds_nested_pipeline(self) -> None:
        """A timeout given to the nested stage bounds the whole inner run: StageTimeoutError, TIMED_OUT."""
        stuck = MockStage("stuck", delay=HOUR)
        inner = pk.Pipeline("inner").add_stage(MockStage("quick", delay=10)).add_stage(stuck)
        outer = pk.Pipeline("outer").add_stage(inner, timeout=30)
        response = await outer.execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert response.stages["inner"].status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.error.stage == "inner"
        assert [call.time for call in stuck.calls] == [10]  # the inner stages share the budget
        assert response.duration == 30

    async def test_failure_with_continue_on_error(self) -> None:
        """A failing nested pipeline added with continue_on_error lets the outer run go on."""
        other = MockStage("other")
        inner = pk.Pipeline("inner").add_stage(MockStage("y", error=ValueError("x")))
        outer = pk.Pipeline("outer").add_stage(inner, continue_on_error=True).add_stage(other, depends_on=())
        response = await outer.execute()
        assert response.ok
        assert response.stages["inner"].status is pk.Status.FAILED
        assert other.call_count == 1

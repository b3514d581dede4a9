"""pipekit.testing itself: mock stages, test pipelines, the fake clock, captures, assertions and fixtures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import structlog.testing
from opentelemetry import trace

import pipekit as pk
from pipekit.testing import (
    Call,
    EventCapture,
    FakeClock,
    FakeClockEventLoop,
    MockStage,
    MockStageError,
    SpanCapture,
    TestPipeline,
    VirtualClock,
    assert_rolled_back,
    assert_span_tree,
    assert_stage_order,
    assert_status,
    capture_events,
    capture_logs,
    capture_spans,
    current_fake_clock,
    fake_clock_backend,
    run_with_fake_clock,
)

ROOT = Path(__file__).resolve().parent.parent
Backend = tuple[str, dict[str, object]]

#: Three attempts, 30 s apart (no growth, no jitter: the delays are exact).
BACKOFF_30S = pk.RetryPolicy(max_attempts=3, initial_delay=30, multiplier=1, jitter=0)
#: Three attempts with no back-off at all, for tests on the real clock.
NO_WAIT = pk.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


def chain(name: str, *stages: MockStage, **retries: pk.RetryPolicy) -> pk.Pipeline:
    """A pipeline running ``stages`` one after the other (``retries`` by stage name)."""
    pipeline = pk.Pipeline(name)
    for stage in stages:
        pipeline = pipeline.add_stage(stage, retry=retries.get(stage.name))
    return pipeline


def entry(pipeline: pk.Pipeline, name: str) -> Any:
    """The entry of stage ``name`` in ``pipeline``."""
    return next(e for e in pipeline.entries if e.name == name)


async def failed_release() -> pk.PipelineResponse:
    """Run build -> push -> deploy (fails) -> notify; build and push are rolled back."""
    pipeline = chain(
        "release",
        MockStage("build", output="img"),
        MockStage("push", output="tag"),
        MockStage("deploy", error=ConnectionError("cluster api unreachable")),
        MockStage("notify"),
    )
    return await pipeline.execute()


async def real_stage(ctx: pk.StageContext) -> str:
    """A real (non-mock) stage."""
    return "real"


def _env_with_pipekit() -> dict[str, str]:
    """The environment, with this checkout importable first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTEST_ADDOPTS", None)
    return env


class TestMockStage:
    async def test_returns_its_output(self) -> None:
        """A mock stage's output is the stage's output in the response."""
        build = MockStage("build", output={"digest": "sha256:1"})
        response = await chain("p", build, MockStage("silent")).execute()
        assert response.ok
        assert response.outputs == {"build": {"digest": "sha256:1"}, "silent": None}

    async def test_error_instance_is_raised_on_every_call(self) -> None:
        """``error=<exception>`` fails every attempt with exactly that exception."""
        boom = ConnectionError("registry down")
        push = MockStage("push", error=boom)
        response = await chain("p", push, push=NO_WAIT).execute()
        assert response.status is pk.Status.FAILED
        assert response.error is not None
        assert response.error.__cause__ is boom
        assert push.call_count == 3

    async def test_error_class_is_instantiated(self) -> None:
        """``error=<class>`` raises a new instance of that class on each call."""
        with capture_events() as events:
            response = await chain("p", MockStage("push", error=PermissionError), push=NO_WAIT).execute()
        errors = [e.error for e in events.of(pk.StageRetrying)] + [response.stages["push"].error]
        assert [type(e) for e in errors] == [PermissionError] * 3
        assert len({id(e) for e in errors}) == 3

    async def test_error_message_becomes_mock_stage_error(self) -> None:
        """``error="..."`` raises a `MockStageError` with that message."""
        response = await chain("p", MockStage("push", error="quota exceeded")).execute()
        cause = response.stages["push"].error
        assert isinstance(cause, MockStageError)
        assert str(cause) == "quota exceeded"

    async def test_fails_fail_times_then_succeeds(self) -> None:
        """The first ``fail_times`` attempts raise `MockStageError`, the next returns the output."""
        push = MockStage("push", output="tag", fail_times=2)
        with capture_events() as events:
            response = await chain("p", push, push=NO_WAIT).execute()
        assert response.ok
        assert response.outputs["push"] == "tag"
        assert response.stages["push"].attempts == 3
        assert [call.attempt for call in push.calls] == [1, 2, 3]
        retried = events.of(pk.StageRetrying)
        assert [type(e.error) for e in retried] == [MockStageError, MockStageError]
        assert str(retried[0].error) == "push failed as planned (call 1 of 2)"

    async def test_fail_times_beyond_the_retries_fails_the_run(self) -> None:
        """A mock planned to fail more often than the policy retries fails the stage."""
        push = MockStage("push", fail_times=5)
        response = await chain("p", push, push=NO_WAIT).execute()
        assert response.status is pk.Status.FAILED
        assert push.call_count == 3
        assert str(response.stages["push"].error) == "push failed as planned (call 3 of 5)"

    async def test_delay_sleeps_on_the_fake_clock(self, pipekit_clock: FakeClock) -> None:
        """``delay`` seconds pass (virtually) before the stage returns."""
        build = MockStage("build", output="img", delay=12.5)
        start = pipekit_clock.now()
        response = await chain("p", build, MockStage("push")).execute()
        assert response.ok
        assert response.duration == 12.5
        assert response.stages["build"].duration == 12.5
        assert pipekit_clock.now() - start == 12.5
        assert build.calls[0].time == start  # recorded when called, before the delay

    async def test_delay_counts_against_the_stage_timeout(self, pipekit_clock: FakeClock) -> None:
        """A delay longer than the stage's timeout times the stage out at exactly the timeout."""
        slow = MockStage("slow", delay=90)
        response = await pk.Pipeline("p").add_stage(slow, timeout=60).execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.duration == 60

    @pytest.mark.parametrize(
        ("rollback_error", "expected_type", "expected_message"),
        [
            pytest.param("undo failed", MockStageError, "undo failed", id="message"),
            pytest.param(OSError("disk full"), OSError, "disk full", id="instance"),
            pytest.param(TimeoutError, TimeoutError, "", id="class"),
        ],
    )
    async def test_rollback_error(
        self, rollback_error: Any, expected_type: type[BaseException], expected_message: str
    ) -> None:
        """``rollback_error`` is raised by ``rollback`` (message, instance or class) and recorded by the run."""
        push = MockStage("push", output="tag", rollback_error=rollback_error)
        response = await chain("p", push, MockStage("deploy", error="down")).execute()
        result = response.stages["push"]
        assert type(result.rollback_error) is expected_type
        assert str(result.rollback_error) == expected_message
        assert not result.rolled_back
        assert result.status is pk.Status.SUCCEEDED  # its rollback failed, so it was not undone
        assert len(push.rollbacks) == 1
        assert push.rolled_back  # rollback was called, even though it raised

    async def test_validate_error_message_becomes_validation_error(self) -> None:
        """``validate_error="..."`` fails validation with a `pipekit.ValidationError`; execute never runs."""
        deploy = MockStage("deploy", validate_error="no cluster configured")
        response = await chain("p", MockStage("build"), deploy).execute()
        assert response.status is pk.Status.FAILED
        cause = response.stages["deploy"].error
        assert isinstance(cause, pk.ValidationError)
        assert str(cause) == "no cluster configured"
        assert len(deploy.validations) == 1
        assert deploy.calls == []

    async def test_validate_error_class_is_raised(self) -> None:
        """``validate_error=<class>`` raises an instance of that class from ``validate``."""
        deploy = MockStage("deploy", validate_error=PermissionError)
        response = await chain("p", deploy).execute()
        assert type(response.stages["deploy"].error) is PermissionError
        assert deploy.calls == []

    async def test_calls_record_the_context_seen(self) -> None:
        """Each call records stage, attempt, request id, copies of input and outputs, dry-run flag and time."""
        build = MockStage("build", output="img")
        push = MockStage("push", output="tag", fail_times=1)
        request = pk.PipelineRequest(id="req-7", input={"version": "1.4.2"})
        before = anyio.current_time()
        response = await chain("p", build, push, push=NO_WAIT).execute(request)
        assert response.ok
        assert [(c.stage, c.attempt, c.request_id) for c in push.calls] == [("push", 1, "req-7"), ("push", 2, "req-7")]
        first = push.calls[0]
        assert first.input == {"version": "1.4.2"}
        assert first.outputs == {"build": "img"}  # only what had finished: not its own output
        assert first.dry_run is False
        assert before <= first.time <= anyio.current_time()
        assert isinstance(first.input, dict)  # a copy, not the run's read-only view
        assert isinstance(first, Call)

    async def test_rollbacks_record_the_context_seen(self) -> None:
        """A rollback call sees the stage's own output and the number of attempts it took."""
        push = MockStage("push", output="tag", fail_times=1)
        response = await chain("p", push, MockStage("deploy", error="down"), push=NO_WAIT).execute()
        assert response.stages["push"].rolled_back
        [undo] = push.rollbacks
        assert undo.stage == "push"
        assert undo.outputs == {"push": "tag"}
        assert undo.attempt == 2  # as for any rollback: ctx.attempt is the attempts the stage took

    async def test_validations_are_recorded_in_dry_runs(self) -> None:
        """A dry run validates the mock (recorded with ``dry_run=True``) without executing it."""
        deploy = MockStage("deploy")
        request = pk.PipelineRequest(input={"env": "prod"}, options=pk.RequestOptions(dry_run=True))
        response = await chain("p", deploy).execute(request)
        assert response.ok
        assert deploy.calls == []
        [check] = deploy.validations
        assert (check.stage, check.dry_run, check.input) == ("deploy", True, {"env": "prod"})

    async def test_reset_forgets_everything_and_restarts_the_plan(self) -> None:
        """``reset()`` clears calls, rollbacks and validations, and ``fail_times`` counts from zero again."""
        push = MockStage("push", output="tag", fail_times=1)
        pipeline = chain("p", push, MockStage("deploy"))
        assert (await pipeline.execute()).status is pk.Status.FAILED
        assert (await pipeline.execute()).ok  # the planned failure is used up
        assert (push.call_count, len(push.validations)) == (2, 2)
        push.reset()
        assert (push.calls, push.rollbacks, push.validations) == ([], [], [])
        assert (await pipeline.execute()).status is pk.Status.FAILED

    def test_repr_and_counters(self) -> None:
        """The repr and the counters start empty."""
        stage = MockStage("push")
        assert repr(stage) == "<MockStage 'push' calls=0 rollbacks=0>"
        assert stage.call_count == 0
        assert not stage.rolled_back
        assert isinstance(stage, pk.BaseStage)


class TestMockStageArguments:
    @pytest.mark.parametrize("fail_times", [-1, 1.5, "2", None, True], ids=repr)
    def test_bad_fail_times(self, fail_times: Any) -> None:
        """``fail_times`` must be an integer >= 0 (not a bool, as everywhere else in pipekit)."""
        with pytest.raises(ValueError, match="fail_times must be an integer >= 0"):
            MockStage("push", fail_times=fail_times)

    @pytest.mark.parametrize("delay", [-0.5, "1", None, math.nan, True], ids=repr)
    def test_bad_delay(self, delay: Any) -> None:
        """``delay`` must be a number of seconds >= 0 (NaN and bools refused)."""
        with pytest.raises(ValueError, match="delay must be a number of seconds >= 0"):
            MockStage("push", delay=delay)

    def test_good_arguments(self) -> None:
        """Integers are accepted as delays and stored as floats."""
        stage = MockStage("push", fail_times=0, delay=3)
        assert stage.delay == 3.0
        assert isinstance(stage.delay, float)


class TestTestPipeline:
    def release(self) -> pk.Pipeline:
        """A pipeline with pipeline- and stage-level policies and a parallel group."""

        async def hook(event: pk.Event) -> None:
            """Ignores events."""

        return (
            pk.Pipeline("release")
            .with_retry(pk.RetryPolicy(max_attempts=2))
            .with_timeout(600)
            .with_rollback(timeout=5)
            .with_hooks(hook)
            .add_stage(MockStage("build", output="img"))
            .add_parallel_stages(MockStage("lint"), MockStage("scan"), limit=1)
            .add_stage(MockStage("push", output="tag"), retry=BACKOFF_30S, timeout=60, depends_on=["build"])
            .add_stage(MockStage("notify"), continue_on_error=True)
        )

    def test_from_pipeline_keeps_the_definition(self) -> None:
        """A test pipeline copies the stages, their positions and policies, and the pipeline's own settings."""
        original = self.release()
        copy = TestPipeline.from_pipeline(original)
        assert isinstance(copy, pk.Pipeline)
        assert copy.name == "release"
        assert copy.entries == original.entries
        for field in ("retry", "timeout", "stage_timeout", "rollback_enabled", "rollback_timeout", "hooks"):
            assert getattr(copy, field) == getattr(original, field), field
        assert (copy.serialised, copy.keeps_partial_outputs) == (False, True)

    def test_from_pipeline_keeps_a_workflow_stage_timeout(self) -> None:
        """A workflow's per-stage timeout survives the copy."""
        workflow = pk.WorkflowPipeline("wf").with_timeout(30).add_stage(MockStage("a"))
        assert TestPipeline.from_pipeline(workflow).stage_timeout == 30

    def test_with_mock_stage_by_output_keeps_position_dependencies_and_policies(self) -> None:
        """Swapping by output puts a `MockStage` in the same entry; everything else is unchanged."""
        original = self.release()
        swapped = TestPipeline.from_pipeline(original).with_mock_stage("push", {"tag": "shop:1"})
        assert swapped.stage_names == original.stage_names
        mock = swapped.mock("push")
        assert isinstance(mock, MockStage)
        assert mock.output == {"tag": "shop:1"}
        assert entry(swapped, "push") == attrs.evolve(entry(original, "push"), stage=mock)
        assert [e for e in swapped.entries if e.name != "push"] == [e for e in original.entries if e.name != "push"]
        assert entry(original, "push").stage is not mock  # the original is untouched

    def test_with_mock_stage_by_mock(self) -> None:
        """Swapping by mock uses that very mock, and ``mock(name)`` returns it."""
        push = MockStage("push", fail_times=1)
        swapped = TestPipeline.from_pipeline(self.release()).with_mock_stage("push", push)
        assert swapped.mock("push") is push
        assert entry(swapped, "push").stage is push

    def test_with_mock_stage_returns_a_test_pipeline(self) -> None:
        """Swaps chain: each returns a new `TestPipeline`."""
        pipeline = TestPipeline.from_pipeline(self.release())
        swapped = pipeline.with_mock_stage("build", "img2").with_mock_stage("lint", None)
        assert isinstance(swapped, TestPipeline)
        assert swapped is not pipeline
        assert (swapped.mock("build").output, swapped.mock("lint").output) == ("img2", None)

    def test_with_mock_stage_refuses_an_unknown_stage(self) -> None:
        """Swapping a stage the pipeline does not have names it."""
        with pytest.raises(pk.PipelineDefinitionError, match="has no stage 'deploy'"):
            TestPipeline.from_pipeline(self.release()).with_mock_stage("deploy", "x")

    def test_with_mock_stage_refuses_a_mock_with_another_name(self) -> None:
        """A given mock must carry the name of the stage it replaces."""
        with pytest.raises(pk.PipelineDefinitionError, match="mock for stage 'push' is named 'pusher'"):
            TestPipeline.from_pipeline(self.release()).with_mock_stage("push", MockStage("pusher"))

    def test_mock_refuses_real_and_unknown_stages(self) -> None:
        """``mock(name)`` raises `KeyError` for a stage that is not a mock, or does not exist."""
        real = pk.Pipeline("p").add_stage(pk.stage(name="build")(real_stage))
        pipeline = TestPipeline.from_pipeline(real)
        with pytest.raises(KeyError, match="'build' of 'p' is not a MockStage"):
            pipeline.mock("build")
        with pytest.raises(KeyError, match="'deploy' of 'p' is not a MockStage"):
            pipeline.mock("deploy")

    def test_from_pipeline_refuses_other_objects(self) -> None:
        """Only pipelines can be copied; a stage is refused with a clear error."""
        with pytest.raises(TypeError, match=r"from_pipeline takes a pipekit\.Pipeline, got MockStage"):
            TestPipeline.from_pipeline(MockStage("build"))  # type: ignore[arg-type]

    async def test_swapped_mock_runs_with_the_real_stages_policies(self, pipekit_clock: FakeClock) -> None:
        """The mock in ``push``'s place is retried by ``push``'s policy, 30 s apart, after its dependency."""
        push = MockStage("push", output="tag", fail_times=2)
        pipeline = TestPipeline.from_pipeline(self.release()).with_mock_stage("push", push)
        start = pipekit_clock.now()
        response = await pipeline.execute()
        assert_status(response, pk.Status.SUCCEEDED)
        assert [call.time - start for call in push.calls] == [0, 30, 60]
        assert push.calls[0].outputs["build"] == "img"

    async def test_swapped_mock_keeps_the_real_stages_timeout(self, pipekit_clock: FakeClock) -> None:
        """A swapped mock slower than the stage's 60 s timeout times out, each attempt, at 60 s."""
        push = MockStage("push", delay=3600)
        pipeline = TestPipeline.from_pipeline(self.release()).with_mock_stage("push", push)
        response = await pipeline.execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert response.stages["push"].attempts == 3
        assert response.stages["push"].duration == 60 + 30 + 60 + 30 + 60

    async def test_from_atomic_pipeline_stays_atomic(self, pipekit_clock: FakeClock) -> None:
        """A copy of an atomic pipeline serialises its runs and keeps no partial outputs."""
        atomic = pk.AtomicPipeline("db").add_stage(MockStage("migrate", output=42, delay=10)).add_stage(MockStage("ok"))
        pipeline = TestPipeline.from_pipeline(atomic).with_mock_stage("ok", MockStage("ok", error="smoke test failed"))
        assert (pipeline.serialised, pipeline.keeps_partial_outputs) == (True, False)
        finished: list[float] = []
        responses: list[pk.PipelineResponse] = []

        async def run_once() -> None:
            responses.append(await pipeline.execute())
            finished.append(pipekit_clock.elapsed())

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_once)
            tg.start_soon(run_once)
        assert finished == [10, 20]  # one after the other
        assert [r.outputs for r in responses] == [{}, {}]
        assert_rolled_back(responses[0], ["migrate"])

    async def test_from_plain_pipeline_runs_concurrently(self, pipekit_clock: FakeClock) -> None:
        """A copy of a plain pipeline overlaps its runs and keeps partial outputs."""
        plain = pk.Pipeline("db").add_stage(MockStage("migrate", output=42, delay=10)).add_stage(MockStage("ok"))
        pipeline = TestPipeline.from_pipeline(plain).with_mock_stage("ok", MockStage("ok", error="smoke test failed"))
        finished: list[float] = []
        responses: list[pk.PipelineResponse] = []

        async def run_once() -> None:
            responses.append(await pipeline.execute())
            finished.append(pipekit_clock.elapsed())

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_once)
            tg.start_soon(run_once)
        assert finished == [10, 10]
        assert [dict(r.outputs) for r in responses] == [{"migrate": 42}, {"migrate": 42}]

    def test_pytest_does_not_collect_it(self, tmp_path: Path) -> None:
        """A test module importing `TestPipeline` collects only its tests, with no collection warning."""
        (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        (tmp_path / "test_user.py").write_text(
            "from pipekit.testing import TestPipeline\n\ndef test_one():\n    assert TestPipeline\n", encoding="utf-8"
        )
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-W", "error"],
            cwd=tmp_path,
            env=_env_with_pipekit(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test_user.py::test_one" in result.stdout
        assert "TestPipeline" not in result.stdout
        assert "1 test collected" in result.stdout


class TestFakeClockFixture:
    async def test_retry_with_back_off_and_timeout_takes_no_real_time(self, pipekit_clock: FakeClock) -> None:
        """3 attempts with 30 s back-off, each timing out at 60 s: 240 virtual seconds in far under a second."""
        deploy = MockStage("deploy", delay=3600)  # hangs
        pipeline = pk.Pipeline("p").add_stage(deploy, retry=BACKOFF_30S, timeout=60)
        start = pipekit_clock.now()
        with capture_events() as events:
            real_start = time.perf_counter()
            response = await pipeline.execute()
            real_elapsed = time.perf_counter() - real_start
        assert real_elapsed < 1.0
        assert_status(response, pk.Status.TIMED_OUT)
        assert [call.time - start for call in deploy.calls] == [0, 90, 180]
        assert [e.delay for e in events.of(pk.StageRetrying)] == [30, 30]
        assert response.duration == 240
        assert pipekit_clock.now() - start == 240

    async def test_retry_that_recovers_has_exact_delays(self, pipekit_clock: FakeClock) -> None:
        """Two planned failures, 30 s back-off, 60 s timeout: attempts at exactly 0, 30 and 60 s."""
        push = MockStage("push", output="tag", fail_times=2)
        start = pipekit_clock.now()
        real_start = time.perf_counter()
        response = await pk.Pipeline("p").add_stage(push, retry=BACKOFF_30S, timeout=60).execute()
        assert time.perf_counter() - real_start < 1.0
        assert_status(response, pk.Status.SUCCEEDED)
        assert [call.time - start for call in push.calls] == [0, 30, 60]
        assert pipekit_clock.elapsed() == 60

    async def test_exponential_back_off_delays_are_exact(self, pipekit_clock: FakeClock) -> None:
        """Growing back-off (30 s, then 60 s) is observed exactly by the stage."""
        push = MockStage("push", fail_times=2)
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=30, multiplier=2, max_delay=300, jitter=0)
        start = pipekit_clock.now()
        await pk.Pipeline("p").add_stage(push, retry=policy).execute()
        assert [call.time - start for call in push.calls] == [0, 30, 90]

    async def test_pipeline_timeout_is_virtual(self, pipekit_clock: FakeClock) -> None:
        """A 60 s pipeline timeout fires after exactly 60 virtual seconds."""
        response = await pk.Pipeline("p").with_timeout(60).add_stage(MockStage("slow", delay=3600)).execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.duration == 60

    async def test_clock_handle(self, pipekit_clock: FakeClock, anyio_backend: Backend) -> None:
        """The fixture's clock is the running loop's: it reads ``anyio.current_time()`` and can be jumped."""
        assert pipekit_clock.backend == anyio_backend[0]
        assert pipekit_clock.now() == anyio.current_time()
        before = pipekit_clock.now()
        pipekit_clock.jump(7)
        assert anyio.current_time() == before + 7
        await anyio.sleep(5)
        assert anyio.current_time() == before + 12
        assert repr(pipekit_clock) == f"<FakeClock {anyio_backend[0]} now={before + 12:g}>"

    async def test_each_variant_runs_on_its_own_fake_clock(
        self, pipekit_clock: FakeClock, anyio_backend: Backend, request: pytest.FixtureRequest
    ) -> None:
        """The test runs once per fake-clock backend, named after it."""
        assert request.node.name.endswith(f"[{pipekit_clock.backend}]")
        assert current_fake_clock().backend == pipekit_clock.backend
        options = anyio_backend[1]
        assert "loop_factory" in options if pipekit_clock.backend == "asyncio" else "clock" in options

    @pytest.mark.pipekit_clock(backends=["trio"])
    async def test_marker_chooses_the_backends(self, pipekit_clock: FakeClock) -> None:
        """``@pytest.mark.pipekit_clock(backends=["trio"])`` runs the test on trio only."""
        assert pipekit_clock.backend == "trio"

    @pytest.mark.pipekit_clock
    async def test_marker_alone_puts_the_test_on_the_fake_clock(self) -> None:
        """A marked test runs on a fake clock without asking for the fixture."""
        clock = current_fake_clock()
        real_start = time.perf_counter()
        await anyio.sleep(86_400)
        assert time.perf_counter() - real_start < 1.0
        assert clock.elapsed() == 86_400


class TestFakeClockBackend:
    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> Backend:
        """Every test of this class runs on a fake clock, set up as the docs suggest."""
        return fake_clock_backend(request.param)

    async def test_the_whole_class_runs_on_virtual_time(self, anyio_backend: Backend) -> None:
        """Sleeps take no real time under ``fake_clock_backend``."""
        clock = current_fake_clock()
        assert clock.backend == anyio_backend[0]
        real_start = time.perf_counter()
        await anyio.sleep(3600)
        assert time.perf_counter() - real_start < 1.0
        assert clock.elapsed() == 3600

    def test_asyncio_backend_uses_a_fake_clock_loop(self) -> None:
        """For asyncio it is a loop factory making `FakeClockEventLoop` with the given autojump threshold."""
        name, options = fake_clock_backend("asyncio", autojump_threshold=0.25)
        assert name == "asyncio"
        factory = options["loop_factory"]
        assert callable(factory)
        loop = factory()
        try:
            assert isinstance(loop, FakeClockEventLoop)
            assert loop.clock.autojump_threshold == 0.25
        finally:
            loop.close()

    def test_trio_backend_uses_a_mock_clock(self) -> None:
        """For trio it is a ``MockClock`` with the given autojump threshold."""
        from trio.testing import MockClock

        name, options = fake_clock_backend("trio", autojump_threshold=0.5)
        assert name == "trio"
        clock = options["clock"]
        assert isinstance(clock, MockClock)
        assert clock.autojump_threshold == 0.5

    def test_extends_given_options(self) -> None:
        """An ``(name, options)`` pair keeps its options and gains the clock."""
        name, options = fake_clock_backend(("asyncio", {"debug": True}))
        assert name == "asyncio"
        assert options["debug"] is True
        assert "loop_factory" in options

    @pytest.mark.parametrize(
        ("backend", "message"),
        [
            (("asyncio", {"use_uvloop": True}), "drop loop_factory/use_uvloop"),
            (("asyncio", {"loop_factory": object}), "drop loop_factory/use_uvloop"),
            ("curio", "no fake clock for backend 'curio'"),
        ],
        ids=["uvloop", "loop_factory", "unknown"],
    )
    def test_refuses_what_it_cannot_fake(self, backend: Any, message: str) -> None:
        """uvloop, a loop factory of one's own and unknown backends are refused."""
        with pytest.raises(ValueError, match=message):
            fake_clock_backend(backend)


class TestRunWithFakeClock:
    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_runs_a_retrying_pipeline_from_sync_code(self, backend: str) -> None:
        """From synchronous code, a retried pipeline runs on virtual time and returns its result."""
        push = MockStage("push", output="tag", fail_times=2)
        pipeline = pk.Pipeline("p").add_stage(push, retry=BACKOFF_30S, timeout=60)

        async def main(label: str) -> tuple[str, str, float, pk.PipelineResponse]:
            clock = current_fake_clock()
            response = await pipeline.execute()
            return label, clock.backend, clock.elapsed(), response

        real_start = time.perf_counter()
        label, used, elapsed, response = run_with_fake_clock(main, "release", backend=backend)
        assert time.perf_counter() - real_start < 1.0
        assert (label, used, elapsed) == ("release", backend, 60)
        assert response.ok
        assert [call.time for call in push.calls] == [0, 30, 60]  # a fresh clock starts at 0

    def test_each_call_gets_a_fresh_clock(self) -> None:
        """Virtual time does not carry over from one call to the next."""

        async def sleep_and_read() -> float:
            await anyio.sleep(100)
            return anyio.current_time()

        assert run_with_fake_clock(sleep_and_read) == run_with_fake_clock(sleep_and_read) == 100


class TestCurrentFakeClock:
    def test_outside_an_event_loop(self) -> None:
        """Without a running event loop it says so."""
        with pytest.raises(RuntimeError, match=r"must be called inside an event loop"):
            current_fake_clock()

    async def test_on_a_real_clock(self, anyio_backend: Backend) -> None:
        """On a real-clock loop it names the backend and how to get a fake clock."""
        with pytest.raises(RuntimeError, match=rf"this {anyio_backend[0]} event loop runs on a real clock"):
            current_fake_clock()


class TestVirtualClock:
    def test_moves_only_when_jumped(self) -> None:
        """Virtual time starts where asked and moves by jumps only."""
        clock = VirtualClock(100)
        assert (clock.now(), clock.elapsed()) == (100, 0)
        clock.jump(2.5)
        assert (clock.now(), clock.elapsed()) == (102.5, 2.5)
        assert repr(clock) == "<VirtualClock now=102.5 autojump_threshold=0.0>"

    def test_refuses_to_go_backwards(self) -> None:
        """Negative and NaN jumps are refused."""
        clock = VirtualClock()
        for seconds in (-1.0, math.nan):
            with pytest.raises(ValueError, match="time can't go backwards"):
                clock.jump(seconds)
        assert clock.now() == 0

    def test_autojump_threshold_is_checked(self) -> None:
        """The threshold can be changed, but never to a negative or NaN value."""
        clock = VirtualClock(autojump_threshold=0.1)
        clock.autojump_threshold = 2
        assert clock.autojump_threshold == 2.0
        for bad in (-1.0, math.nan):
            with pytest.raises(ValueError, match="autojump_threshold must be >= 0"):
                clock.autojump_threshold = bad

    def test_event_loop_time_is_the_clock(self) -> None:
        """`FakeClockEventLoop.time()` reads its virtual clock."""
        loop = FakeClockEventLoop(VirtualClock(50))
        try:
            assert loop.time() == 50
            loop.clock.jump(10)
            assert loop.time() == 60
        finally:
            loop.close()


class TestCaptureSpans:
    async def test_tree_of_a_failed_run(self) -> None:
        """The tree nests stage and rollback spans under the run's, errors marked."""
        with capture_spans() as spans:
            await failed_release()
        assert spans.tree() == textwrap.dedent(
            """\
            pipeline release [ERROR]
                stage build
                stage push
                stage deploy [ERROR]
                rollback push
                rollback build"""
        )

    async def test_tree_of_a_retried_stage(self) -> None:
        """A retried stage gets one child span per attempt; failed attempts are marked."""
        with capture_spans() as spans:
            await chain("p", MockStage("push", fail_times=2), push=NO_WAIT).execute()
        assert spans.tree().splitlines()[1:] == [
            "    stage push",
            "        stage push attempt 1 [ERROR]",
            "        stage push attempt 2 [ERROR]",
            "        stage push attempt 3",
        ]

    async def test_names_and_find(self) -> None:
        """``names()`` lists spans in start order; ``find`` returns the one span of that name."""
        with capture_spans() as spans:
            await failed_release()
        assert spans.names() == [
            "pipeline release",
            "stage build",
            "stage push",
            "stage deploy",
            "rollback push",
            "rollback build",
        ]
        deploy = spans.find("stage deploy")
        assert deploy.attributes is not None
        assert deploy.attributes["pipekit.stage.name"] == "deploy"
        assert deploy.status.status_code is trace.StatusCode.ERROR

    async def test_find_refuses_missing_and_ambiguous_names(self) -> None:
        """``find`` raises `AssertionError` listing the names when there is no span, or several."""
        with capture_spans() as spans:
            await chain("p", MockStage("a")).execute()
            await chain("p", MockStage("a")).execute()
        with pytest.raises(AssertionError, match=r"expected one span 'stage b', found 0 among \['pipeline p'"):
            spans.find("stage b")
        with pytest.raises(AssertionError, match="expected one span 'stage a', found 2"):
            spans.find("stage a")

    async def test_metric_points(self) -> None:
        """``metric_points`` gives each point's attributes and value (a histogram's count)."""
        with capture_spans() as spans:
            await failed_release()
            await chain("release", MockStage("build")).execute()
        executions = sorted(spans.metric_points("pipekit.executions"), key=lambda p: p[0]["pipekit.status"])
        assert executions == [
            ({"pipekit.pipeline.name": "release", "pipekit.status": "failed"}, 1),
            ({"pipekit.pipeline.name": "release", "pipekit.status": "succeeded"}, 1),
        ]
        assert sum(count for _, count in spans.metric_points("pipekit.execution.duration")) == 2
        assert spans.metric_points("no.such.metric") == []

    async def test_installs_no_global_provider_and_stops_at_exit(self) -> None:
        """Nothing becomes global; runs after the block are not captured, and the capture stays readable."""
        global_provider = trace.get_tracer_provider()
        with capture_spans() as spans:
            assert trace.get_tracer_provider() is global_provider
            assert spans.tracer_provider is not global_provider
            await chain("p", MockStage("a")).execute()
        await chain("p", MockStage("b")).execute()
        assert spans.names() == ["pipeline p", "stage a"]
        assert spans.metric_points("pipekit.executions") == [
            ({"pipekit.pipeline.name": "p", "pipekit.status": "succeeded"}, 1)
        ]

    async def test_clear(self) -> None:
        """``clear()`` forgets the spans captured so far."""
        with capture_spans() as spans:
            await chain("p", MockStage("a")).execute()
            spans.clear()
            await chain("q", MockStage("b")).execute()
        assert spans.names() == ["pipeline q", "stage b"]

    async def test_child_tasks_are_captured(self) -> None:
        """Runs in tasks started inside the block are captured."""
        with capture_spans() as spans:
            async with anyio.create_task_group() as tg:
                tg.start_soon(chain("p", MockStage("a")).execute)
                tg.start_soon(chain("q", MockStage("b")).execute)
        assert sorted(spans.names()) == ["pipeline p", "pipeline q", "stage a", "stage b"]

    async def test_everywhere_reaches_tasks_started_before(self) -> None:
        """An engine entered before the block is reached with ``everywhere=True`` only."""
        pipeline = chain("p", MockStage("a"))
        async with pk.Engine() as engine:
            with capture_spans() as local:
                await engine.execute(pipeline)
            with capture_spans(everywhere=True) as everywhere:
                await engine.execute(pipeline)
        assert local.names() == []
        assert everywhere.names() == ["pipeline p", "stage a"]


class TestAssertSpanTree:
    async def test_passes_on_the_exact_tree(self) -> None:
        """The tree the run made passes, written with any consistent indentation."""
        with capture_spans() as spans:
            await failed_release()
        assert_span_tree(
            spans,
            """
            pipeline release [ERROR]
              stage build
              stage push
              stage deploy [ERROR]
              rollback push
              rollback build
            """,
        )

    async def test_passes_with_siblings_in_any_order(self) -> None:
        """Siblings (parallel stages, rollbacks) may be listed in any order."""
        pipeline = pk.Pipeline("ci").add_parallel_stages(MockStage("lint"), MockStage("test"), MockStage("scan"))
        with capture_spans() as spans:
            await pipeline.add_stage(MockStage("deploy", error="down")).execute()
        assert_span_tree(
            spans,
            """
            pipeline ci [ERROR]
                rollback test
                stage scan
                rollback scan
                stage deploy [ERROR]
                stage test
                rollback lint
                stage lint
            """,
        )

    async def test_passes_with_same_named_siblings_in_any_order(self) -> None:
        """Two runs of one pipeline that took different paths may be listed in either order."""
        optional = MockStage("publish")
        pipeline = chain("p", MockStage("build")).add_conditional_stage(optional, lambda ctx: bool(ctx.input))
        with capture_spans() as spans:
            await pipeline.execute(input={"publish": True})
            await pipeline.execute()
        assert_span_tree(
            spans,
            """
            pipeline p
                stage build
            pipeline p
                stage build
                stage publish
            """,
        )

    async def test_fails_showing_both_trees(self) -> None:
        """A missing span fails, and the message shows the expected and the actual tree."""
        with capture_spans() as spans:
            await chain("p", MockStage("a"), MockStage("b")).execute()
        with pytest.raises(AssertionError) as excinfo:
            assert_span_tree(spans, "pipeline p\n    stage a\n    stage c\n")
        assert str(excinfo.value) == (
            "the spans do not form the expected tree\n"
            "expected:\n    pipeline p\n        stage a\n        stage c\n"
            "actual:\n    pipeline p\n        stage a\n        stage b"
        )

    async def test_fails_when_nesting_differs(self) -> None:
        """The same names at other depths do not pass."""
        with capture_spans() as spans:
            await chain("p", MockStage("a")).execute()
        with pytest.raises(AssertionError, match="do not form the expected tree"):
            assert_span_tree(spans, "pipeline p\nstage a\n")

    async def test_error_markers_must_match(self) -> None:
        """``[ERROR]`` is required where a span failed, and refused where it did not."""
        with capture_spans() as spans:
            await chain("p", MockStage("a", error="boom")).execute()
        with pytest.raises(AssertionError, match=r"actual:\n    pipeline p \[ERROR\]\n        stage a \[ERROR\]"):
            assert_span_tree(spans, "pipeline p [ERROR]\n    stage a\n")
        with pytest.raises(AssertionError):
            assert_span_tree(spans, "pipeline p\n    stage a [ERROR]\n")
        assert_span_tree(spans, "pipeline p [ERROR]\n    stage a [ERROR]\n")


class TestCaptureEvents:
    async def test_kinds_of_a_failed_run(self) -> None:
        """``kinds()`` lists every event of the run in order."""
        with capture_events() as events:
            await failed_release()
        assert events.kinds() == [
            "pipeline_started",
            "stage_started",
            "stage_succeeded",
            "stage_started",
            "stage_succeeded",
            "stage_started",
            "stage_failed",
            "stage_skipped",
            "rollback_started",
            "stage_rolled_back",
            "stage_rolled_back",
            "rollback_finished",
            "pipeline_finished",
        ]
        assert len(events) == 13
        assert [e.kind for e in events] == events.kinds()

    async def test_of_and_for_stage(self) -> None:
        """``of(type)`` filters by event class, ``for_stage(name)`` by stage."""
        with capture_events() as events:
            await failed_release()
        [failed] = events.of(pk.StageFailed)
        assert (failed.stage, failed.status) == ("deploy", pk.Status.FAILED)
        assert [e.stage for e in events.of(pk.StageRolledBack)] == ["push", "build"]
        assert [e.kind for e in events.for_stage("push")] == ["stage_started", "stage_succeeded", "stage_rolled_back"]
        assert [e.kind for e in events.for_stage("notify")] == ["stage_skipped"]

    async def test_engines_created_inside_are_captured(self) -> None:
        """Runs of an engine created inside the block are captured, with their request ids."""
        with capture_events() as events:
            async with pk.Engine() as engine:
                response = await engine.execute(chain("p", MockStage("a")))
        assert events.kinds() == [
            "pipeline_started",
            "stage_started",
            "stage_succeeded",
            "pipeline_finished",
        ]
        assert {e.request_id for e in events} == {response.id}

    async def test_everywhere_reaches_engines_created_before(self) -> None:
        """An engine created before the block is reached with ``everywhere=True`` only."""
        pipeline = chain("p", MockStage("a"))
        async with pk.Engine() as engine:
            with capture_events() as local:
                await engine.execute(pipeline)
            with capture_events(everywhere=True) as everywhere:
                await engine.execute(pipeline)
        assert len(local) == 0
        assert len(everywhere) == 4

    async def test_everywhere_records_each_event_once(self) -> None:
        """With ``everywhere=True``, a run in the current task is still recorded once, not twice."""
        with capture_events(everywhere=True) as events:
            await chain("p", MockStage("a")).execute()
        assert events.kinds() == ["pipeline_started", "stage_started", "stage_succeeded", "pipeline_finished"]

    async def test_stops_at_exit_and_clears(self) -> None:
        """Runs after the block are not captured; ``clear()`` forgets what was."""
        with capture_events() as events:
            await chain("p", MockStage("a")).execute()
            events.clear()
            await chain("q", MockStage("b")).execute()
        await chain("r", MockStage("c")).execute()
        assert {e.pipeline for e in events} == {"q"}
        assert isinstance(events, EventCapture)


class TestCaptureLogs:
    def test_is_structlogs(self) -> None:
        """``capture_logs`` is structlog's own."""
        assert capture_logs is structlog.testing.capture_logs

    async def test_captures_pipekit_logs(self, pipekit_clock: FakeClock) -> None:
        """The retry log records carry the stage, attempt and exact delay."""
        with capture_logs() as logs:
            await chain("p", MockStage("push", fail_times=1), push=BACKOFF_30S).execute()
        [retry] = [log for log in logs if log["event"] == "pipekit.stage.retry_scheduled"]
        assert (retry["stage"], retry["attempt"], retry["delay"]) == ("push", 1, 30.0)


class TestAssertStatus:
    async def test_passes(self) -> None:
        """The run's own status passes."""
        assert_status(await failed_release(), pk.Status.FAILED)

    async def test_fails_showing_the_run(self) -> None:
        """Another status fails, naming both and showing the run's summary."""
        response = await failed_release()
        with pytest.raises(AssertionError) as excinfo:
            assert_status(response, pk.Status.SUCCEEDED)
        message = str(excinfo.value)
        assert message.startswith("expected the run to be succeeded, it is failed\n\n")
        assert response.summary() in message


class TestAssertStageOrder:
    async def test_passes_with_the_stages_that_started(self) -> None:
        """The stages that started, in order, pass; skipped stages are not listed."""
        assert_stage_order(await failed_release(), ["build", "push", "deploy"])

    @pytest.mark.parametrize(
        "order",
        [["push", "build", "deploy"], ["build", "push", "deploy", "notify"], ["build", "push"]],
        ids=["swapped", "skipped-stage-included", "missing"],
    )
    async def test_fails_showing_the_run(self, order: list[str]) -> None:
        """Any other order fails with both orders and the run's summary."""
        response = await failed_release()
        with pytest.raises(AssertionError) as excinfo:
            assert_stage_order(response, order)
        message = str(excinfo.value)
        assert f"expected the stages to start in the order {order}, they started ['build', 'push', 'deploy']" in message
        assert response.summary() in message


class TestAssertRolledBack:
    async def test_passes_in_any_order_by_default(self) -> None:
        """Without ``order``, the set of rolled-back stages must match."""
        response = await failed_release()
        assert_rolled_back(response, ["build", "push"])
        assert_rolled_back(response, ["push", "build"])

    async def test_passes_in_rollback_order(self) -> None:
        """With ``order=True``, the stages must be listed in the order they were rolled back."""
        assert_rolled_back(await failed_release(), ["push", "build"], order=True)

    async def test_fails_in_the_wrong_order(self) -> None:
        """With ``order=True``, the wrong order fails, showing both orders and the run's summary."""
        response = await failed_release()
        with pytest.raises(AssertionError) as excinfo:
            assert_rolled_back(response, ["build", "push"], order=True)
        message = str(excinfo.value)
        assert "expected rollbacks in the order ['build', 'push'], they ran ['push', 'build']" in message
        assert response.summary() in message

    async def test_fails_with_other_stages(self) -> None:
        """Without ``order``, a missing or extra stage fails, showing the run's summary."""
        response = await failed_release()
        with pytest.raises(AssertionError) as excinfo:
            assert_rolled_back(response, ["push"])
        message = str(excinfo.value)
        assert "expected ['push'] rolled back, got ['build', 'push']" in message
        assert response.summary() in message
        with pytest.raises(AssertionError, match=r"got \['build', 'push'\]"):
            assert_rolled_back(response, ["build", "deploy", "push"])

    async def test_a_failed_rollback_does_not_count(self) -> None:
        """A stage whose rollback raised was not rolled back."""
        pipeline = chain(
            "p", MockStage("build"), MockStage("push", rollback_error="registry down"), MockStage("deploy", error="x")
        )
        response = await pipeline.execute()
        assert_rolled_back(response, ["build"], order=True)
        with pytest.raises(AssertionError, match="rollback failed: MockStageError: registry down"):
            assert_rolled_back(response, ["build", "push"])

    async def test_nothing_rolled_back(self) -> None:
        """A successful run rolled nothing back."""
        response = await chain("p", MockStage("a")).execute()
        assert_rolled_back(response, [])
        with pytest.raises(AssertionError, match=r"expected \['a'\] rolled back, got \[\]"):
            assert_rolled_back(response, ["a"])


class TestFixtures:
    def test_mock_stage_is_a_factory(self, mock_stage: Callable[..., MockStage]) -> None:
        """``mock_stage(...)`` makes a configured `MockStage`."""
        stage = mock_stage("build", output={"digest": "x"}, fail_times=2, delay=1.5)
        assert isinstance(stage, MockStage)
        assert (stage.name, stage.output, stage.fail_times, stage.delay) == ("build", {"digest": "x"}, 2, 1.5)
        assert mock_stage("other") is not mock_stage("other")

    async def test_pipekit_spans_captures_the_tests_runs(
        self, pipekit_spans: SpanCapture, mock_stage: Callable[..., MockStage]
    ) -> None:
        """Runs in the test are captured without a ``with`` block, engines included."""
        await chain("p", mock_stage("a")).execute()
        async with pk.Engine() as engine:
            await engine.execute(chain("q", mock_stage("b", error="boom")))
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage a
            pipeline q [ERROR]
                stage b [ERROR]
            """,
        )

    async def test_pipekit_events_captures_the_tests_runs(
        self, pipekit_events: EventCapture, mock_stage: Callable[..., MockStage]
    ) -> None:
        """Events of runs in the test are captured without a ``with`` block."""
        response = await chain("p", mock_stage("a", fail_times=1), a=NO_WAIT).execute()
        assert pipekit_events.kinds() == [
            "pipeline_started",
            "stage_started",
            "stage_retrying",
            "stage_succeeded",
            "pipeline_finished",
        ]
        assert {e.request_id for e in pipekit_events} == {response.id}

    async def test_pipekit_events_starts_empty(self, pipekit_events: EventCapture) -> None:
        """Each test gets a capture of its own: nothing from earlier tests."""
        assert len(pipekit_events) == 0
        await chain("p", MockStage("a")).execute()
        assert len(pipekit_events) == 4

    async def test_fixtures_work_together_on_the_fake_clock(
        self, pipekit_clock: FakeClock, pipekit_spans: SpanCapture, pipekit_events: EventCapture
    ) -> None:
        """Clock, spans and events combine: a retried stage's delays and attempt spans."""
        start = pipekit_clock.now()
        await chain("p", MockStage("push", fail_times=1), push=BACKOFF_30S).execute()
        assert [e.delay for e in pipekit_events.of(pk.StageRetrying)] == [30]
        assert pipekit_clock.now() - start == 30
        assert_span_tree(
            pipekit_spans,
            """
            pipeline p
                stage push
                    stage push attempt 1 [ERROR]
                    stage push attempt 2
            """,
        )


class TestKitFeatureCoverage:
    """Held mocks, no-rollback mocks, rollback delays, sampled-out captures, SDK metrics, call order, chosen errors."""

    async def test_block_holds_each_call_until_release(self, pipekit_clock: FakeClock) -> None:
        """A ``block=True`` mock starts, then waits (an hour of virtual time too) until ``release``."""
        held = MockStage("a", output="x", block=True)
        responses: list[pk.PipelineResponse] = []

        async def run() -> None:
            responses.append(await chain("p", held).execute())

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await held.wait_started()
            assert held.call_count == 1
            assert not held.released
            await anyio.sleep(3600)
            assert responses == []  # still held
            held.release()
            assert held.released
        [response] = responses
        assert response.ok
        assert response.stages["a"].output == "x"
        assert pipekit_clock.elapsed() == 3600  # it finished the moment it was released

    async def test_release_lets_later_calls_through_and_reset_re_arms(self, pipekit_clock: FakeClock) -> None:
        """After ``release`` calls no longer wait; ``reset()`` forgets the calls and holds the next call again."""
        held = MockStage("a", block=True)
        held.release()
        with anyio.fail_after(1):
            assert (await chain("p", held).execute()).ok
            assert (await chain("p", held).execute()).ok
        assert held.call_count == 2
        held.reset()
        assert held.calls == []
        assert not held.released
        done = anyio.Event()

        async def run() -> None:
            assert (await chain("p", held).execute()).ok
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await held.wait_started()
            await anyio.sleep(60)
            assert not done.is_set()  # held again
            held.release()
        assert done.is_set()
        assert held.call_count == 1

    async def test_rollback_false_is_never_compensated(self, pipekit_events: EventCapture) -> None:
        """A ``rollback=False`` mock still records its calls but has no rollback: a failure does not undo it."""
        a, b = MockStage("a", output="a", rollback=False), MockStage("b")
        response = await chain("p", a, b, MockStage("boom", error=ValueError("no"))).execute()
        assert_status(response, pk.Status.FAILED)
        assert_rolled_back(response, ["b"])
        assert len(a.calls) == 1
        assert a.rollbacks == []
        assert (response.stages["a"].status, response.stages["a"].rolled_back) == (pk.Status.SUCCEEDED, False)
        assert [e.stage for e in pipekit_events.of(pk.StageRolledBack)] == ["b"]
        # With nothing else to undo, no rollback happens at all.
        pipekit_events.clear()
        alone = MockStage("alone", rollback=False)
        await chain("q", alone, MockStage("boom", error=ValueError("no"))).execute()
        assert pipekit_events.of(pk.RollbackStarted) == []
        assert alone.rollbacks == []

    async def test_rollback_delay_takes_virtual_time(self, pipekit_clock: FakeClock) -> None:
        """``rollback_delay`` makes the rollback take that long on the fake clock, then succeed."""
        start = pipekit_clock.now()
        slow = MockStage("slow", rollback_delay=30)  # within the default 60 s rollback timeout
        response = await chain("p", slow, MockStage("boom", error=ValueError("no"))).execute()
        assert_rolled_back(response, ["slow"])
        assert [call.time for call in slow.rollbacks] == [start]  # recorded when it started
        assert pipekit_clock.now() - start == 30

    async def test_infinite_rollback_delay_hangs_until_the_rollback_timeout(self, pipekit_clock: FakeClock) -> None:
        """``rollback_delay=math.inf`` never finishes: the rollback timeout cuts it off."""
        stuck = MockStage("stuck", rollback_delay=math.inf)
        pipeline = chain("p", stuck, MockStage("boom", error=ValueError("no"))).with_rollback(timeout=7)
        response = await pipeline.execute()
        assert len(stuck.rollbacks) == 1
        assert response.stages["stuck"].rollback_error is not None
        assert not response.stages["stuck"].rolled_back
        assert pipekit_clock.elapsed() == 7

    async def test_capture_spans_with_an_always_off_sampler(self) -> None:
        """``capture_spans(sampler=ALWAYS_OFF)`` records no span, but metrics still."""
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        with capture_spans(sampler=ALWAYS_OFF) as spans:
            assert spans.tracer_provider.sampler is ALWAYS_OFF
            assert (await chain("p", MockStage("a")).execute()).ok
        assert spans.spans == ()
        assert spans.names() == []
        assert spans.metric_points("pipekit.executions") == [
            ({"pipekit.pipeline.name": "p", "pipekit.status": "succeeded"}, 1)
        ]
        with capture_spans() as sampled:  # the SDK default samples the run
            assert (await chain("p", MockStage("a")).execute()).ok
        assert sampled.names() == ["pipeline p", "stage a"]

    async def test_metric_and_metric_names(self) -> None:
        """``metric(name)`` is the SDK's metric (kind, unit, points with sums); ``metric_names()`` lists them."""
        from opentelemetry.sdk.metrics.export import Histogram, Sum

        with capture_spans() as spans:
            assert spans.metric_names() == set()
            responses = [await chain("p", MockStage("a")).execute() for _ in range(2)]
            responses.append(await chain("p", MockStage("a", error=ValueError("no"))).execute())
        assert {"pipekit.executions", "pipekit.execution.duration", "pipekit.stage.runs"} <= spans.metric_names()
        assert "pipekit.stage.retries" not in spans.metric_names()  # nothing retried
        executions = spans.metric("pipekit.executions")
        assert executions.unit == "{execution}"
        assert isinstance(executions.data, Sum)
        assert executions.data.is_monotonic
        by_status = {dict(p.attributes or {})["pipekit.status"]: p.value for p in executions.data.data_points}
        assert by_status == {"succeeded": 2, "failed": 1}
        duration = spans.metric("pipekit.execution.duration")
        assert duration.unit == "s"
        assert isinstance(duration.data, Histogram)
        assert sum(p.count for p in duration.data.data_points) == 3
        assert math.isclose(sum(p.sum for p in duration.data.data_points), sum(r.duration for r in responses))
        with pytest.raises(AssertionError, match=r"no metric 'pipekit\.nope' recorded; recorded: \['pipekit\."):
            spans.metric("pipekit.nope")

    async def test_call_sequence_orders_calls_made_at_the_same_instant(self, pipekit_clock: FakeClock) -> None:
        """Validate, execute and rollback calls of every mock share one sequence, in the order they were made."""
        a, b = MockStage("a"), MockStage("b", error=ValueError("no"))
        await chain("p", a, b).execute()
        calls = [a.validations[0], a.calls[0], b.validations[0], b.calls[0], a.rollbacks[0]]
        assert len({call.time for call in calls}) == 1  # all at the same (virtual) instant
        sequences = [call.sequence for call in calls]
        assert sequences == sorted(sequences)
        assert len(set(sequences)) == len(sequences)

    async def test_call_pipeline_names_the_pipeline_being_run(self) -> None:
        """``Call.pipeline`` is the pipeline the call ran in: a nested pipeline's own name for its stages."""
        outer_stage, inner_stage = MockStage("a"), MockStage("x")
        inner = pk.Pipeline("inner").add_stage(inner_stage)
        response = await pk.Pipeline("outer").add_stage(outer_stage).add_stage(inner).execute()
        assert response.ok
        assert [call.pipeline for call in outer_stage.validations + outer_stage.calls] == ["outer", "outer"]
        assert [call.pipeline for call in inner_stage.calls] == ["inner"]

    async def test_error_with_fail_times_fails_with_that_error_then_succeeds(
        self, pipekit_events: EventCapture
    ) -> None:
        """With ``error`` and ``fail_times`` the first calls raise ``error`` (instance, class or message), then pass."""
        down = ConnectionError("down")
        flaky = MockStage("flaky", output="ok", fail_times=2, error=down)
        by_class = MockStage("by_class", fail_times=1, error=TimeoutError)
        by_message = MockStage("by_message", fail_times=1, error="try again")
        response = await chain(
            "p", flaky, by_class, by_message, flaky=NO_WAIT, by_class=NO_WAIT, by_message=NO_WAIT
        ).execute()
        assert response.ok
        assert response.stages["flaky"].output == "ok"
        assert [call.attempt for call in flaky.calls] == [1, 2, 3]
        errors = {
            stage: [e.error for e in pipekit_events.of(pk.StageRetrying) if e.stage == stage]
            for stage in ("flaky", "by_class", "by_message")
        }
        assert errors["flaky"] == [down, down]
        assert [type(e) for e in errors["by_class"]] == [TimeoutError]
        assert [(type(e), str(e)) for e in errors["by_message"]] == [(MockStageError, "try again")]
        # Without a retry, the stage fails with the chosen error itself.
        once = MockStage("once", fail_times=1, error=down)
        failed = await chain("q", once).execute()
        assert failed.stages["once"].error is down

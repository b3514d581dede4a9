"""Retry policies: validation, back-off delays, filtering, events and cancellable sleeps."""

from __future__ import annotations

import itertools
import math
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import pipekit as pk
from pipekit.testing import FakeClock, MockStage, MockStageError, assert_status, capture_events, capture_logs

#: Run the test on the fake clock (pipekit.testing), on the backends conftest's ``anyio_backend`` uses.
fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])


class FakeSleep:
    """A retry sleep (the policy's injectable ``sleep=``) that records each requested delay and never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(float(seconds))
        await anyio.lowlevel.checkpoint()


def waits(stage: MockStage) -> list[float]:
    """The (virtual) seconds between one attempt of ``stage`` and the next."""
    times = [call.time for call in stage.calls]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def run_stage(stage: pk.Stage, policy: pk.RetryPolicy, **execute_kwargs: Any) -> pk.PipelineResponse:
    """Run ``stage`` alone under ``policy``."""
    return await pk.Pipeline("p").add_stage(stage, retry=policy).execute(**execute_kwargs)


class TestRetryPolicyValues:
    """RetryPolicy is a frozen, validated value."""

    def test_defaults(self) -> None:
        """The defaults are those of the spec."""
        policy = pk.RetryPolicy()
        assert policy.max_attempts == 3
        assert policy.initial_delay == 1.0
        assert policy.max_delay == 30.0
        assert policy.multiplier == 2.0
        assert policy.jitter == 0.1
        assert policy.retry_on == (Exception,)
        assert policy.should_retry is None

    def test_frozen(self) -> None:
        """A policy cannot be changed after it is made."""
        policy = pk.RetryPolicy()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            policy.max_attempts = 5  # type: ignore[misc]

    def test_equal_by_value(self) -> None:
        """Policies with the same settings are equal."""
        assert pk.RetryPolicy(max_attempts=5, jitter=0) == pk.RetryPolicy(max_attempts=5, jitter=0)
        assert pk.RetryPolicy(max_attempts=5) != pk.RetryPolicy(max_attempts=4)

    @pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
    def test_bad_max_attempts_rejected(self, value: Any) -> None:
        """max_attempts must be an integer >= 1; the message names the field and the value."""
        with pytest.raises(pk.PipelineDefinitionError, match="max_attempts") as info:
            pk.RetryPolicy(max_attempts=value)
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize("field", ["initial_delay", "max_delay", "jitter"])
    @pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1"])
    def test_bad_seconds_rejected(self, field: str, value: Any) -> None:
        """Delays and jitter must be finite numbers >= 0; the message names the field."""
        with pytest.raises(pk.PipelineDefinitionError, match=field):
            pk.RetryPolicy(**{field: value})

    @pytest.mark.parametrize("value", [0.5, 0, -2, math.inf])
    def test_bad_multiplier_rejected(self, value: float) -> None:
        """The multiplier must be a finite number >= 1."""
        with pytest.raises(pk.PipelineDefinitionError, match="multiplier"):
            pk.RetryPolicy(multiplier=value)

    def test_bad_retry_on_rejected(self) -> None:
        """retry_on takes exception classes only."""
        with pytest.raises(pk.PipelineDefinitionError, match="retry_on"):
            pk.RetryPolicy(retry_on=(ValueError, "TimeoutError"))

    def test_retry_on_list_becomes_tuple(self) -> None:
        """retry_on given as a list is stored as a tuple."""
        policy = pk.RetryPolicy(retry_on=[KeyError, OSError])
        assert policy.retry_on == (KeyError, OSError)

    def test_zero_delays_allowed(self) -> None:
        """Zero delays and zero jitter are valid."""
        policy = pk.RetryPolicy(initial_delay=0, max_delay=0, jitter=0)
        assert (policy.initial_delay, policy.max_delay, policy.jitter) == (0, 0, 0)


class TestExponentialBackoff:
    """pk.ExponentialBackoff builds a RetryPolicy."""

    def test_builds_policy(self) -> None:
        """Its arguments map onto the policy's fields."""

        def only_io(exc: BaseException) -> bool:
            return True

        policy = pk.ExponentialBackoff(
            max_attempts=5, initial=0.5, maximum=4, multiplier=3, jitter=0, retry_on=(OSError,), should_retry=only_io
        )
        assert isinstance(policy, pk.RetryPolicy)
        assert policy == pk.RetryPolicy(
            max_attempts=5, initial_delay=0.5, max_delay=4, multiplier=3, jitter=0, retry_on=(OSError,)
        )
        assert policy.should_retry is only_io

    def test_defaults_match_retry_policy(self) -> None:
        """Without arguments it equals the default RetryPolicy."""
        assert pk.ExponentialBackoff() == pk.RetryPolicy()

    def test_validates(self) -> None:
        """Its arguments are validated like the policy's."""
        with pytest.raises(pk.PipelineDefinitionError, match="max_attempts"):
            pk.ExponentialBackoff(max_attempts=0)


class TestDelay:
    """RetryPolicy.delay(n): the back-off after failed attempt n, without jitter."""

    def test_exponential_growth(self) -> None:
        """The delay starts at initial_delay and is multiplied each attempt."""
        policy = pk.RetryPolicy(initial_delay=0.5, multiplier=3, max_delay=100)
        assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 13.5]

    def test_default_delays(self) -> None:
        """The default policy waits 1 s, then 2 s, then 4 s."""
        policy = pk.RetryPolicy()
        assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]

    def test_capped_by_max_delay(self) -> None:
        """No delay exceeds max_delay."""
        policy = pk.RetryPolicy(initial_delay=1, multiplier=10, max_delay=50)
        assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1, 10, 50, 50]

    def test_constant_with_multiplier_one(self) -> None:
        """A multiplier of 1 gives constant delays."""
        policy = pk.RetryPolicy(initial_delay=2, multiplier=1)
        assert {policy.delay(n) for n in range(1, 6)} == {2}


class TestRetryCounts:
    """How many attempts are made and how long the run sleeps between them."""

    @fake_clock
    async def test_gives_up_after_max_attempts(self) -> None:
        """A stage that always fails is attempted max_attempts times, sleeping in between."""
        stage = MockStage("s", error=OSError("down"))
        response = await run_stage(stage, pk.RetryPolicy(max_attempts=4, jitter=0))
        assert [call.attempt for call in stage.calls] == [1, 2, 3, 4]
        assert waits(stage) == [1.0, 2.0, 4.0]
        result = response.stages["s"]
        assert result.status is pk.Status.FAILED
        assert result.attempts == 4
        assert result.error is stage.error
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.attempts == 4
        assert response.error.__cause__ is stage.error

    @fake_clock
    async def test_exact_delays_follow_multiplier(self) -> None:
        """With jitter 0 the delays slept are initial_delay * multiplier ** (n - 1)."""
        stage = MockStage("s", error=OSError("down"))
        policy = pk.RetryPolicy(max_attempts=4, initial_delay=1, multiplier=3, max_delay=100, jitter=0)
        response = await run_stage(stage, policy)
        assert waits(stage) == [1.0, 3.0, 9.0]
        assert waits(stage) == [policy.delay(n) for n in (1, 2, 3)]
        assert response.duration == 13

    @fake_clock
    async def test_fractional_initial_delay(self) -> None:
        """An initial delay other than 1 s is honoured exactly (and raises no warning)."""
        stage = MockStage("s", error=OSError("down"))
        policy = pk.RetryPolicy(max_attempts=4, initial_delay=0.25, multiplier=2, jitter=0)
        response = await run_stage(stage, policy)
        assert [call.attempt for call in stage.calls] == [1, 2, 3, 4]
        assert waits(stage) == [0.25, 0.5, 1.0]
        assert response.stages["s"].error is stage.error

    @fake_clock
    async def test_zero_initial_delay(self) -> None:
        """An initial delay of 0 retries immediately."""
        stage = MockStage("s", fail_times=2)
        with capture_events() as events:
            response = await run_stage(stage, pk.RetryPolicy(initial_delay=0, jitter=0))
        assert response.ok, response.summary()
        assert [e.delay for e in events.of(pk.StageRetrying)] == [0.0, 0.0]
        assert [call.time for call in stage.calls] == [0, 0, 0]

    @fake_clock
    async def test_max_delay_caps_recorded_delays(self) -> None:
        """No delay slept exceeds max_delay."""
        stage = MockStage("s", error=OSError("down"))
        policy = pk.RetryPolicy(max_attempts=5, multiplier=10, max_delay=5, jitter=0)
        await run_stage(stage, policy)
        assert waits(stage) == [1.0, 5.0, 5.0, 5.0]

    @fake_clock
    async def test_jitter_bounded(self) -> None:
        """Jitter adds between 0 and `jitter` seconds to each delay."""
        stage = MockStage("s", error=OSError("down"))
        with capture_events() as events:
            await run_stage(stage, pk.RetryPolicy(max_attempts=6, multiplier=1, max_delay=10, jitter=0.5))
        delays = [e.delay for e in events.of(pk.StageRetrying)]
        assert len(delays) == 5
        assert all(1.0 <= d <= 1.5 for d in delays), delays
        assert waits(stage) == pytest.approx(delays)  # and those are the delays slept

    @fake_clock
    async def test_single_attempt_never_sleeps(self) -> None:
        """max_attempts=1 makes one attempt and never sleeps."""
        stage = MockStage("s", error=OSError("down"))
        with capture_events() as events:
            response = await run_stage(stage, pk.RetryPolicy(max_attempts=1))
        assert [call.attempt for call in stage.calls] == [1]
        assert events.of(pk.StageRetrying) == []
        assert response.duration == 0
        assert response.stages["s"].attempts == 1

    async def test_no_policy_means_one_attempt(self) -> None:
        """Without any policy a failing stage is attempted once."""
        stage = MockStage("s", error=OSError("down"))
        response = await pk.Pipeline("p").add_stage(stage).execute()
        assert [call.attempt for call in stage.calls] == [1]
        assert response.stages["s"].attempts == 1

    @fake_clock
    async def test_last_error_reported(self) -> None:
        """When every attempt fails, the error of the last attempt is the one reported."""

        @pk.stage
        async def changing(ctx: pk.StageContext) -> None:
            raise OSError(f"failure {ctx.attempt}")

        response = await run_stage(changing, pk.RetryPolicy(max_attempts=3, jitter=0))
        assert str(response.stages["changing"].error) == "failure 3"
        assert str(response.error.__cause__ if response.error else None) == "failure 3"

    @fake_clock
    async def test_pipeline_policy_is_the_default(self) -> None:
        """with_retry applies to stages without a policy; a stage's own policy wins."""
        default, own = MockStage("default", fail_times=2), MockStage("own", fail_times=1)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(default)
            .add_stage(own, retry=pk.RetryPolicy(max_attempts=2, initial_delay=5, multiplier=1, jitter=0))
            .with_retry(pk.RetryPolicy(max_attempts=3, jitter=0))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert (response.stages["default"].attempts, response.stages["own"].attempts) == (3, 2)
        assert waits(default) == [1.0, 2.0]
        assert waits(own) == [5.0]

    @fake_clock
    async def test_timed_out_attempt_is_retried(self) -> None:
        """An attempt exceeding the stage timeout is retried like any failure."""

        @pk.stage
        async def hangs_once(ctx: pk.StageContext) -> int:
            if ctx.attempt == 1:
                await anyio.sleep_forever()
            return ctx.attempt

        pipeline = pk.Pipeline("p").add_stage(hangs_once, timeout=30, retry=pk.RetryPolicy(jitter=0))
        with anyio.fail_after(3600), capture_events() as events:
            response = await pipeline.execute()
        assert response.ok, response.summary()
        assert response.outputs["hangs_once"] == 2
        retrying = events.of(pk.StageRetrying)
        assert [(e.attempt, e.delay, type(e.error)) for e in retrying] == [(1, 1.0, pk.StageTimeoutError)]
        assert response.duration == 31  # the 30 s timeout, then the 1 s back-off


class TestRetryFilter:
    """Which errors are retried: retry_on, should_retry and the never-retried errors."""

    def test_is_retryable(self) -> None:
        """is_retryable applies retry_on, then should_retry."""
        policy = pk.RetryPolicy(retry_on=(OSError,), should_retry=lambda exc: "transient" in str(exc))
        assert policy.is_retryable(OSError("transient glitch"))
        assert not policy.is_retryable(OSError("disk full"))
        assert not policy.is_retryable(ValueError("transient"))

    @pytest.mark.parametrize(
        "error",
        [
            pk.ValidationError("bad input"),
            pk.ContextConflictError("k", stage="a", other="b"),
            pk.PipelineDefinitionError("broken"),
        ],
    )
    def test_never_retried_errors(self, error: Exception) -> None:
        """ValidationError, ContextConflictError and PipelineDefinitionError are never retryable."""
        policy = pk.RetryPolicy(retry_on=(BaseException,), should_retry=lambda exc: True)
        assert not policy.is_retryable(error)

    @fake_clock
    async def test_retry_on_excludes_other_errors(self) -> None:
        """An error not in retry_on fails the stage at once."""
        stage = MockStage("s", error=ValueError("bug"))
        with capture_events() as events:
            response = await run_stage(stage, pk.RetryPolicy(retry_on=(OSError,)))
        assert [call.attempt for call in stage.calls] == [1]
        assert events.of(pk.StageRetrying) == []
        assert response.duration == 0
        assert response.stages["s"].attempts == 1

    @fake_clock
    async def test_retry_on_matches_subclasses(self) -> None:
        """Subclasses of a retry_on class are retried."""
        reset_once = MockStage("s", output="ok", fail_times=1, error=ConnectionResetError("reset"))
        with capture_events() as events:
            response = await run_stage(reset_once, pk.RetryPolicy(retry_on=(OSError,), jitter=0))
        assert response.ok
        assert response.stages["s"].output == "ok"
        assert [call.attempt for call in reset_once.calls] == [1, 2]
        [retrying] = events.of(pk.StageRetrying)
        assert isinstance(retrying.error, ConnectionResetError)  # the subclass was what got retried

    @fake_clock
    async def test_should_retry_filters(self) -> None:
        """should_retry returning False stops retrying."""
        seen: list[BaseException] = []

        def transient_only(exc: BaseException) -> bool:
            seen.append(exc)
            return "transient" in str(exc)

        stage = MockStage("s", error=OSError("permanent"))
        with capture_events() as events:
            await run_stage(stage, pk.RetryPolicy(should_retry=transient_only))
        assert [call.attempt for call in stage.calls] == [1]
        assert seen == [stage.error]
        assert events.of(pk.StageRetrying) == []

    @fake_clock
    async def test_should_retry_allows(self) -> None:
        """should_retry returning True lets the policy retry."""
        stage = MockStage("s", fail_times=2)
        policy = pk.RetryPolicy(should_retry=lambda exc: isinstance(exc, MockStageError), jitter=0)
        response = await run_stage(stage, policy)
        assert response.ok
        assert [call.attempt for call in stage.calls] == [1, 2, 3]

    @fake_clock
    async def test_error_changing_to_non_retryable_stops(self) -> None:
        """A later attempt failing with a non-retryable error ends the retries with that error."""

        @pk.stage
        async def worsening(ctx: pk.StageContext) -> None:
            if ctx.attempt == 1:
                raise OSError("transient")
            raise KeyError("fatal")

        with capture_events() as events:
            response = await run_stage(worsening, pk.RetryPolicy(max_attempts=5, retry_on=(OSError,)))
        result = response.stages["worsening"]
        assert result.attempts == 2
        assert isinstance(result.error, KeyError)
        assert [e.attempt for e in events.of(pk.StageRetrying)] == [1]

    @fake_clock
    async def test_validation_error_from_execute_not_retried(self) -> None:
        """A ValidationError raised by execute is never retried."""
        stage = MockStage("s", error=pk.ValidationError("bad"))
        with capture_events() as events:
            response = await run_stage(stage, pk.RetryPolicy(retry_on=(Exception,)))
        assert [call.attempt for call in stage.calls] == [1]
        assert events.of(pk.StageRetrying) == []
        assert isinstance(response.stages["s"].error, pk.ValidationError)

    @fake_clock
    async def test_validation_error_from_validate_not_retried(self) -> None:
        """A stage whose validate rejects the request is not retried and never executed."""
        picky = MockStage("picky", validate_error=pk.ValidationError("nope"))
        with capture_events() as events:
            response = await run_stage(picky, pk.RetryPolicy())
        assert len(picky.validations) == 1
        assert picky.calls == []
        assert events.of(pk.StageRetrying) == []
        assert response.stages["picky"].status is pk.Status.FAILED
        assert isinstance(response.stages["picky"].error, pk.ValidationError)

    @fake_clock
    async def test_context_conflict_not_retried(self) -> None:
        """A stage hitting a ContextConflictError is not retried."""
        key = pk.Key[int]("k")
        first_wrote = anyio.Event()
        attempts: list[int] = []

        @pk.stage
        async def first(ctx: pk.StageContext) -> None:
            ctx[key] = 1
            first_wrote.set()

        @pk.stage
        async def second(ctx: pk.StageContext) -> None:
            attempts.append(ctx.attempt)
            await first_wrote.wait()
            ctx[key] = 2

        pipeline = pk.Pipeline("p").add_parallel_stages(
            first, second, retry=pk.RetryPolicy(max_attempts=5), continue_on_error=True
        )
        with anyio.fail_after(5), capture_events() as events:
            response = await pipeline.execute()
        assert attempts == [1]
        assert events.of(pk.StageRetrying) == []
        assert isinstance(response.stages["second"].error, pk.ContextConflictError)


class TestEventualSuccess:
    """A stage that succeeds after failures."""

    @fake_clock
    async def test_succeeds_on_third_attempt(self) -> None:
        """The run succeeds; attempts and ctx.attempt record the retries."""
        stage = MockStage("s", output="ok on 3", fail_times=2)
        response = await run_stage(stage, pk.RetryPolicy(max_attempts=5, jitter=0))
        assert response.ok
        assert response.error is None
        result = response.stages["s"]
        assert result.status is pk.Status.SUCCEEDED
        assert result.attempts == 3
        assert result.error is None
        assert result.output == "ok on 3"
        assert [call.attempt for call in stage.calls] == [1, 2, 3]
        assert waits(stage) == [1.0, 2.0]

    @fake_clock
    async def test_retried_stage_output_flows_on(self) -> None:
        """The output of the successful attempt is what later stages see."""
        stage, after = MockStage("s", output="ok on 2", fail_times=1), MockStage("after")
        pipeline = pk.Pipeline("p").add_stage(stage, retry=pk.RetryPolicy(jitter=0)).add_stage(after)
        assert (await pipeline.execute()).ok
        assert [call.outputs["s"] for call in after.calls] == ["ok on 2"]


class TestRetryEvents:
    """pk.StageRetrying events announce each retry."""

    async def test_events_carry_attempt_delay_and_error(self) -> None:
        """One StageRetrying per retry, with the failed attempt, the coming delay (the one slept) and the error."""
        sleep = FakeSleep()
        errors = [OSError("first"), OSError("second")]

        @pk.stage
        async def flaky(ctx: pk.StageContext) -> str:
            if ctx.attempt <= len(errors):
                raise errors[ctx.attempt - 1]
            return "ok"

        policy = pk.RetryPolicy(max_attempts=3, multiplier=3, jitter=0, sleep=sleep)
        request = pk.PipelineRequest(id="r-1")
        with capture_events() as events:
            response = await pk.Pipeline("p").add_stage(flaky, retry=policy).execute(request)
        assert response.ok
        retrying = events.of(pk.StageRetrying)
        assert [(e.stage, e.attempt, e.delay) for e in retrying] == [("flaky", 1, 1.0), ("flaky", 2, 3.0)]
        assert [e.error for e in retrying] == errors
        assert {(e.request_id, e.pipeline) for e in retrying} == {("r-1", "p")}
        assert [e.delay for e in retrying] == sleep.delays

    async def test_event_announced_before_the_sleep(self) -> None:
        """Each StageRetrying event is delivered before the sleep it announces."""
        sleeps: list[tuple[float, list[tuple[int, float]]]] = []

        async def sleep(seconds: float) -> None:
            announced = [(e.attempt, e.delay) for e in events.of(pk.StageRetrying)]
            sleeps.append((seconds, announced))

        stage = MockStage("s", fail_times=2)
        policy = pk.RetryPolicy(jitter=0, sleep=sleep)
        with capture_events() as events:
            await pk.Pipeline("p").add_stage(stage, retry=policy).execute()
        assert sleeps == [(1.0, [(1, 1.0)]), (2.0, [(1, 1.0), (2, 2.0)])]

    @fake_clock
    async def test_no_event_without_retry(self) -> None:
        """A stage that fails without being retried emits no StageRetrying."""
        stage = MockStage("s", error=ValueError("x"))
        with capture_events() as events:
            await pk.Pipeline("p").add_stage(stage, retry=pk.RetryPolicy(retry_on=(OSError,))).execute()
        assert not events.of(pk.StageRetrying)
        assert [e.attempt for e in events.of(pk.StageFailed)] == [1]

    @fake_clock
    async def test_retry_logged(self) -> None:
        """Each scheduled retry is logged as pipekit.stage.retry_scheduled with its attempt and delay."""
        stage = MockStage("s", fail_times=1)
        with capture_logs() as logs:
            await run_stage(stage, pk.RetryPolicy(jitter=0))
        scheduled = [e for e in logs if e["event"] == "pipekit.stage.retry_scheduled"]
        assert [(e["stage"], e["attempt"], e["delay"]) for e in scheduled] == [("s", 1, 1.0)]


class TestCancellableSleep:
    """Retry sleeps are cancellable: cancelling the run interrupts them."""

    async def test_outer_cancellation_interrupts_retry_sleep(self) -> None:
        """Cancelling the caller during a retry sleep ends the run: no further attempt, status CANCELLED."""
        stage = MockStage("s", error=OSError("down"))

        with anyio.fail_after(5), anyio.CancelScope() as scope, capture_events() as events:

            async def sleep(seconds: float) -> None:
                scope.cancel()
                await anyio.sleep_forever()

            await run_stage(stage, pk.RetryPolicy(max_attempts=5, sleep=sleep))
        assert scope.cancelled_caught
        assert [call.attempt for call in stage.calls] == [1]
        finished = events.of(pk.PipelineFinished)
        assert len(finished) == 1
        assert finished[0].status is pk.Status.CANCELLED

    @fake_clock
    async def test_run_timeout_interrupts_retry_sleep(self) -> None:
        """A whole-run timeout firing during a long retry sleep ends the run as TIMED_OUT."""
        stage = MockStage("s", error=OSError("down"))
        policy = pk.RetryPolicy(max_attempts=5, initial_delay=60, jitter=0, sleep=anyio.sleep)
        request = pk.PipelineRequest(options=pk.RequestOptions(timeout=10))
        response = await pk.Pipeline("p").add_stage(stage, retry=policy).execute(request)
        assert [call.attempt for call in stage.calls] == [1]
        assert_status(response, pk.Status.TIMED_OUT)
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.stages["s"].status is pk.Status.TIMED_OUT
        assert response.duration == 10  # not the 60 s back-off

    @fake_clock
    async def test_default_sleep_is_anyio_sleep(self, pipekit_clock: FakeClock) -> None:
        """Without an injected sleep the policy sleeps with anyio (cancellable by a run timeout)."""
        stage = MockStage("s", error=OSError("down"))
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=60, jitter=0)
        pipeline = pk.Pipeline("p").add_stage(stage, retry=policy).with_timeout(10)
        response = await pipeline.execute()
        assert_status(response, pk.Status.TIMED_OUT)
        assert [call.attempt for call in stage.calls] == [1]
        assert pipekit_clock.elapsed() == 10  # anyio.sleep ran on the (fake) event-loop clock

    @fake_clock
    async def test_injected_sleep_replaces_anyio_sleep(self, pipekit_clock: FakeClock) -> None:
        """An injected sleep is used instead of anyio.sleep: it gets every delay, and no event-loop time passes."""
        sleep = FakeSleep()
        stage = MockStage("s", fail_times=2)
        response = await run_stage(stage, pk.RetryPolicy(initial_delay=30, max_delay=300, jitter=0, sleep=sleep))
        assert response.ok, response.summary()
        assert sleep.delays == [30.0, 60.0]
        assert [call.time for call in stage.calls] == [0, 0, 0]
        assert pipekit_clock.elapsed() == 0

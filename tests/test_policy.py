"""Retry policies: validation, back-off delays, filtering, events and cancellable sleeps."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
import structlog

import pipekit as pk

StageFn = Callable[[pk.StageContext], Awaitable[Any]]


class FakeSleep:
    """A retry sleep that records each requested delay and never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(float(seconds))
        await anyio.lowlevel.checkpoint()


class Flaky:
    """A stage failing with ``error`` until attempt ``succeed_on`` (never, when None)."""

    def __init__(self, name: str, error: BaseException, succeed_on: int | None = None) -> None:
        self.name = name
        self.error = error
        self.succeed_on = succeed_on
        self.attempts_seen: list[int] = []

    async def execute(self, ctx: pk.StageContext) -> str:
        self.attempts_seen.append(ctx.attempt)
        if self.succeed_on is not None and ctx.attempt >= self.succeed_on:
            return f"ok on {ctx.attempt}"
        raise self.error


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

    async def test_gives_up_after_max_attempts(self) -> None:
        """A stage that always fails is attempted max_attempts times, sleeping in between."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        response = await run_stage(stage, pk.RetryPolicy(max_attempts=4, jitter=0, sleep=sleep))
        assert stage.attempts_seen == [1, 2, 3, 4]
        assert sleep.delays == [1.0, 2.0, 4.0]
        result = response.stages["s"]
        assert result.status is pk.Status.FAILED
        assert result.attempts == 4
        assert result.error is stage.error
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.attempts == 4
        assert response.error.__cause__ is stage.error

    async def test_exact_delays_follow_multiplier(self) -> None:
        """With jitter 0 the recorded delays are initial_delay * multiplier ** (n - 1)."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        policy = pk.RetryPolicy(max_attempts=4, initial_delay=1, multiplier=3, max_delay=100, jitter=0, sleep=sleep)
        await run_stage(stage, policy)
        assert sleep.delays == [1.0, 3.0, 9.0]
        assert sleep.delays == [policy.delay(n) for n in (1, 2, 3)]

    async def test_fractional_initial_delay(self) -> None:
        """An initial delay other than 1 s is honoured exactly (and raises no warning)."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        policy = pk.RetryPolicy(max_attempts=4, initial_delay=0.25, multiplier=2, jitter=0, sleep=sleep)
        response = await run_stage(stage, policy)
        assert stage.attempts_seen == [1, 2, 3, 4]
        assert sleep.delays == [0.25, 0.5, 1.0]
        assert response.stages["s"].error is stage.error

    async def test_zero_initial_delay(self) -> None:
        """An initial delay of 0 retries immediately."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"), succeed_on=3)
        response = await run_stage(stage, pk.RetryPolicy(initial_delay=0, jitter=0, sleep=sleep))
        assert response.ok, response.summary()
        assert sleep.delays == [0.0, 0.0]

    async def test_max_delay_caps_recorded_delays(self) -> None:
        """No recorded delay exceeds max_delay."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        policy = pk.RetryPolicy(max_attempts=5, multiplier=10, max_delay=5, jitter=0, sleep=sleep)
        await run_stage(stage, policy)
        assert sleep.delays == [1.0, 5.0, 5.0, 5.0]

    async def test_jitter_bounded(self) -> None:
        """Jitter adds between 0 and `jitter` seconds to each delay."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        await run_stage(stage, pk.RetryPolicy(max_attempts=6, multiplier=1, max_delay=10, jitter=0.5, sleep=sleep))
        assert len(sleep.delays) == 5
        assert all(1.0 <= d <= 1.5 for d in sleep.delays), sleep.delays

    async def test_single_attempt_never_sleeps(self) -> None:
        """max_attempts=1 makes one attempt and never sleeps."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("down"))
        response = await run_stage(stage, pk.RetryPolicy(max_attempts=1, sleep=sleep))
        assert stage.attempts_seen == [1]
        assert sleep.delays == []
        assert response.stages["s"].attempts == 1

    async def test_no_policy_means_one_attempt(self) -> None:
        """Without any policy a failing stage is attempted once."""
        stage = Flaky("s", OSError("down"))
        response = await pk.Pipeline("p").add_stage(stage).execute()
        assert stage.attempts_seen == [1]
        assert response.stages["s"].attempts == 1

    async def test_last_error_reported(self) -> None:
        """When every attempt fails, the error of the last attempt is the one reported."""
        sleep = FakeSleep()

        @pk.stage
        async def changing(ctx: pk.StageContext) -> None:
            raise OSError(f"failure {ctx.attempt}")

        response = await run_stage(changing, pk.RetryPolicy(max_attempts=3, jitter=0, sleep=sleep))
        assert str(response.stages["changing"].error) == "failure 3"
        assert str(response.error.__cause__ if response.error else None) == "failure 3"

    async def test_pipeline_policy_is_the_default(self) -> None:
        """with_retry applies to stages without a policy; a stage's own policy wins."""
        pipeline_sleep, stage_sleep = FakeSleep(), FakeSleep()
        default = Flaky("default", OSError("x"), succeed_on=3)
        own = Flaky("own", OSError("y"), succeed_on=2)
        pipeline = (
            pk.Pipeline("p")
            .add_stage(default)
            .add_stage(
                own, retry=pk.RetryPolicy(max_attempts=2, initial_delay=1, multiplier=1, jitter=0, sleep=stage_sleep)
            )
            .with_retry(pk.RetryPolicy(max_attempts=3, jitter=0, sleep=pipeline_sleep))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert (response.stages["default"].attempts, response.stages["own"].attempts) == (3, 2)
        assert pipeline_sleep.delays == [1.0, 2.0]
        assert stage_sleep.delays == [1.0]

    async def test_timed_out_attempt_is_retried(self) -> None:
        """An attempt exceeding the stage timeout is retried like any failure."""
        sleep = FakeSleep()

        @pk.stage
        async def hangs_once(ctx: pk.StageContext) -> int:
            if ctx.attempt == 1:
                await anyio.sleep_forever()
            return ctx.attempt

        pipeline = pk.Pipeline("p").add_stage(hangs_once, timeout=0.05, retry=pk.RetryPolicy(jitter=0, sleep=sleep))
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.ok, response.summary()
        assert response.outputs["hangs_once"] == 2
        assert sleep.delays == [1.0]


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

    async def test_retry_on_excludes_other_errors(self) -> None:
        """An error not in retry_on fails the stage at once."""
        sleep = FakeSleep()
        stage = Flaky("s", ValueError("bug"))
        response = await run_stage(stage, pk.RetryPolicy(retry_on=(OSError,), sleep=sleep))
        assert stage.attempts_seen == [1]
        assert sleep.delays == []
        assert response.stages["s"].attempts == 1

    async def test_retry_on_matches_subclasses(self) -> None:
        """Subclasses of a retry_on class are retried."""
        sleep = FakeSleep()
        stage = Flaky("s", ConnectionResetError("reset"), succeed_on=2)
        response = await run_stage(stage, pk.RetryPolicy(retry_on=(OSError,), jitter=0, sleep=sleep))
        assert response.ok
        assert stage.attempts_seen == [1, 2]

    async def test_should_retry_filters(self) -> None:
        """should_retry returning False stops retrying."""
        sleep = FakeSleep()
        seen: list[BaseException] = []

        def transient_only(exc: BaseException) -> bool:
            seen.append(exc)
            return "transient" in str(exc)

        stage = Flaky("s", OSError("permanent"))
        await run_stage(stage, pk.RetryPolicy(should_retry=transient_only, sleep=sleep))
        assert stage.attempts_seen == [1]
        assert seen == [stage.error]
        assert sleep.delays == []

    async def test_should_retry_allows(self) -> None:
        """should_retry returning True lets the policy retry."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("transient"), succeed_on=3)
        policy = pk.RetryPolicy(should_retry=lambda exc: "transient" in str(exc), jitter=0, sleep=sleep)
        response = await run_stage(stage, policy)
        assert response.ok
        assert stage.attempts_seen == [1, 2, 3]

    async def test_error_changing_to_non_retryable_stops(self) -> None:
        """A later attempt failing with a non-retryable error ends the retries with that error."""
        sleep = FakeSleep()

        @pk.stage
        async def worsening(ctx: pk.StageContext) -> None:
            if ctx.attempt == 1:
                raise OSError("transient")
            raise KeyError("fatal")

        response = await run_stage(worsening, pk.RetryPolicy(max_attempts=5, retry_on=(OSError,), sleep=sleep))
        result = response.stages["worsening"]
        assert result.attempts == 2
        assert isinstance(result.error, KeyError)
        assert len(sleep.delays) == 1

    async def test_validation_error_from_execute_not_retried(self) -> None:
        """A ValidationError raised by execute is never retried."""
        sleep = FakeSleep()
        stage = Flaky("s", pk.ValidationError("bad"))
        response = await run_stage(stage, pk.RetryPolicy(retry_on=(Exception,), sleep=sleep))
        assert stage.attempts_seen == [1]
        assert sleep.delays == []
        assert isinstance(response.stages["s"].error, pk.ValidationError)

    async def test_validation_error_from_validate_not_retried(self) -> None:
        """A stage whose validate rejects the request is not retried and never executed."""
        sleep = FakeSleep()
        executed: list[int] = []

        class Picky(pk.BaseStage):
            name = "picky"

            def validate(self, ctx: pk.StageContext) -> None:
                raise pk.ValidationError("nope")

            async def execute(self, ctx: pk.StageContext) -> None:
                executed.append(ctx.attempt)

        response = await run_stage(Picky(), pk.RetryPolicy(sleep=sleep))
        assert executed == []
        assert sleep.delays == []
        assert response.stages["picky"].status is pk.Status.FAILED
        assert isinstance(response.stages["picky"].error, pk.ValidationError)

    async def test_context_conflict_not_retried(self) -> None:
        """A stage hitting a ContextConflictError is not retried."""
        sleep = FakeSleep()
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
            first, second, retry=pk.RetryPolicy(max_attempts=5, sleep=sleep), continue_on_error=True
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert attempts == [1]
        assert sleep.delays == []
        assert isinstance(response.stages["second"].error, pk.ContextConflictError)


class TestEventualSuccess:
    """A stage that succeeds after failures."""

    async def test_succeeds_on_third_attempt(self) -> None:
        """The run succeeds; attempts and ctx.attempt record the retries."""
        sleep = FakeSleep()
        stage = Flaky("s", ConnectionError("flaky"), succeed_on=3)
        response = await run_stage(stage, pk.RetryPolicy(max_attempts=5, jitter=0, sleep=sleep))
        assert response.ok
        assert response.error is None
        result = response.stages["s"]
        assert result.status is pk.Status.SUCCEEDED
        assert result.attempts == 3
        assert result.error is None
        assert result.output == "ok on 3"
        assert stage.attempts_seen == [1, 2, 3]
        assert sleep.delays == [1.0, 2.0]

    async def test_retried_stage_output_flows_on(self) -> None:
        """The output of the successful attempt is what later stages see."""
        sleep = FakeSleep()
        stage = Flaky("s", ConnectionError("flaky"), succeed_on=2)
        seen: list[Any] = []

        @pk.stage
        async def after(ctx: pk.StageContext) -> None:
            seen.append(ctx.outputs["s"])

        pipeline = pk.Pipeline("p").add_stage(stage, retry=pk.RetryPolicy(jitter=0, sleep=sleep)).add_stage(after)
        assert (await pipeline.execute()).ok
        assert seen == ["ok on 2"]


class TestRetryEvents:
    """pk.StageRetrying events announce each retry."""

    async def test_events_carry_attempt_delay_and_error(self) -> None:
        """One StageRetrying per retry, with the failed attempt, the coming delay and the error."""
        sleep = FakeSleep()
        events: list[pk.Event] = []

        async def hook(event: pk.Event) -> None:
            events.append(event)

        errors = [OSError("first"), OSError("second")]

        @pk.stage
        async def flaky(ctx: pk.StageContext) -> str:
            if ctx.attempt <= len(errors):
                raise errors[ctx.attempt - 1]
            return "ok"

        policy = pk.RetryPolicy(max_attempts=3, multiplier=3, jitter=0, sleep=sleep)
        request = pk.PipelineRequest(id="r-1")
        response = await pk.Pipeline("p").add_stage(flaky, retry=policy).execute(request, hooks=[hook])
        assert response.ok
        retrying = [e for e in events if isinstance(e, pk.StageRetrying)]
        assert [(e.stage, e.attempt, e.delay) for e in retrying] == [("flaky", 1, 1.0), ("flaky", 2, 3.0)]
        assert [e.error for e in retrying] == errors
        assert {(e.request_id, e.pipeline) for e in retrying} == {("r-1", "p")}
        assert [e.delay for e in retrying] == sleep.delays

    async def test_event_announced_before_the_sleep(self) -> None:
        """Each StageRetrying event is delivered before the sleep it announces."""
        order: list[str] = []

        async def hook(event: pk.Event) -> None:
            if isinstance(event, pk.StageRetrying):
                order.append(f"event {event.attempt}")

        async def sleep(seconds: float) -> None:
            order.append(f"sleep {seconds:g}")

        stage = Flaky("s", OSError("x"), succeed_on=3)
        policy = pk.RetryPolicy(jitter=0, sleep=sleep)
        await pk.Pipeline("p").add_stage(stage, retry=policy).execute(hooks=[hook])
        assert order == ["event 1", "sleep 1", "event 2", "sleep 2"]

    async def test_no_event_without_retry(self) -> None:
        """A stage that fails without being retried emits no StageRetrying."""
        events: list[pk.Event] = []

        async def hook(event: pk.Event) -> None:
            events.append(event)

        stage = Flaky("s", ValueError("x"))
        await pk.Pipeline("p").add_stage(stage, retry=pk.RetryPolicy(retry_on=(OSError,))).execute(hooks=[hook])
        assert not [e for e in events if isinstance(e, pk.StageRetrying)]
        assert [e.attempt for e in events if isinstance(e, pk.StageFailed)] == [1]

    async def test_retry_logged(self) -> None:
        """Each scheduled retry is logged as pipekit.stage.retry_scheduled with its attempt and delay."""
        sleep = FakeSleep()
        stage = Flaky("s", OSError("x"), succeed_on=2)
        with structlog.testing.capture_logs() as logs:
            await run_stage(stage, pk.RetryPolicy(jitter=0, sleep=sleep))
        scheduled = [e for e in logs if e["event"] == "pipekit.stage.retry_scheduled"]
        assert [(e["stage"], e["attempt"], e["delay"]) for e in scheduled] == [("s", 1, 1.0)]


class TestCancellableSleep:
    """Retry sleeps are cancellable: cancelling the run interrupts them."""

    async def test_outer_cancellation_interrupts_retry_sleep(self) -> None:
        """Cancelling the caller during a retry sleep ends the run: no further attempt, status CANCELLED."""
        events: list[pk.Event] = []
        stage = Flaky("s", OSError("down"))

        async def hook(event: pk.Event) -> None:
            events.append(event)

        with anyio.fail_after(5), anyio.CancelScope() as scope:

            async def sleep(seconds: float) -> None:
                scope.cancel()
                await anyio.sleep_forever()

            await run_stage(stage, pk.RetryPolicy(max_attempts=5, sleep=sleep), hooks=[hook])
        assert scope.cancelled_caught
        assert stage.attempts_seen == [1]
        finished = [e for e in events if isinstance(e, pk.PipelineFinished)]
        assert len(finished) == 1
        assert finished[0].status is pk.Status.CANCELLED

    async def test_run_timeout_interrupts_retry_sleep(self) -> None:
        """A whole-run timeout firing during a long retry sleep ends the run as TIMED_OUT."""
        stage = Flaky("s", OSError("down"))
        policy = pk.RetryPolicy(max_attempts=5, initial_delay=1, jitter=0, sleep=anyio.sleep)
        request = pk.PipelineRequest(options=pk.RequestOptions(timeout=0.05))
        with anyio.fail_after(5):
            response = await pk.Pipeline("p").add_stage(stage, retry=policy).execute(request)
        assert stage.attempts_seen == [1]
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert response.stages["s"].status is pk.Status.TIMED_OUT
        assert response.duration < 0.9

    async def test_default_sleep_is_anyio_sleep(self) -> None:
        """Without an injected sleep the policy sleeps with anyio (cancellable by a run timeout)."""
        stage = Flaky("s", OSError("down"))
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=1, jitter=0)
        pipeline = pk.Pipeline("p").add_stage(stage, retry=policy).with_timeout(0.05)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert response.status is pk.Status.TIMED_OUT
        assert stage.attempts_seen == [1]

"""Retry policies, implemented on tenacity (private) with cancellable sleeps."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs
import tenacity as _t

from ._errors import ContextConflictError, PipelineDefinitionError, ValidationError

__all__ = ["ExponentialBackoff", "RetryPolicy"]

T = TypeVar("T")
SleepFunction = Callable[[float], Awaitable[Any]]

#: Errors that no policy retries: retrying cannot fix them.
NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ValidationError,
    ContextConflictError,
    PipelineDefinitionError,
)


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise PipelineDefinitionError(f"RetryPolicy.{attribute.name} must be a finite number >= 0, got {value!r}")


def _check_attempts(_inst: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PipelineDefinitionError(f"RetryPolicy.max_attempts must be an integer >= 1, got {value!r}")


def _check_multiplier(_inst: object, _attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 1:
        raise PipelineDefinitionError(f"RetryPolicy.multiplier must be a number >= 1, got {value!r}")


def _to_exc_types(value: Any) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple | list) else (value,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise PipelineDefinitionError(f"RetryPolicy.retry_on takes exception classes, got {t!r}")
    return tuple(types)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How often, and how patiently, to retry a failing stage.

    The delay before attempt ``n + 1`` is
    ``min(initial_delay * multiplier ** (n - 1) + uniform(0, jitter), max_delay)``
    seconds. Sleeps use `anyio.sleep`, so cancelling the run interrupts
    them. [`ValidationError`][pipekit.ValidationError], [`ContextConflictError`][pipekit.ContextConflictError]
    and cancellation are never retried.

    Args:
        max_attempts: Attempts in total, the first included (1 disables retrying).
        initial_delay: Seconds before the second attempt.
        max_delay: Upper bound for any one delay.
        multiplier: Growth factor of the delay per attempt.
        jitter: Up to this many random seconds added to each delay.
        retry_on: Exception classes worth retrying.
        should_retry: Optional predicate; an exception is retried only when it
            also returns True.
        sleep: The sleep function (``anyio.sleep`` by default); inject a
            recording fake in tests so they never really wait.
    """

    max_attempts: int = attrs.field(default=3, validator=_check_attempts)
    initial_delay: float = attrs.field(default=1.0, validator=_non_negative)
    max_delay: float = attrs.field(default=30.0, validator=_non_negative)
    multiplier: float = attrs.field(default=2.0, validator=_check_multiplier)
    jitter: float = attrs.field(default=0.1, validator=_non_negative)
    retry_on: tuple[type[BaseException], ...] = attrs.field(default=(Exception,), converter=_to_exc_types)
    should_retry: Callable[[BaseException], bool] | None = attrs.field(default=None, eq=False)
    sleep: SleepFunction | None = attrs.field(default=None, eq=False, repr=False)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt under this policy."""
        if isinstance(exc, NEVER_RETRIED) or not isinstance(exc, self.retry_on):
            return False
        return self.should_retry is None or bool(self.should_retry(exc))

    def delay(self, attempt: int) -> float:
        """The delay after failed attempt ``attempt`` (1-based), without jitter."""
        return min(self.initial_delay * self.multiplier ** (attempt - 1), self.max_delay)

    def _wait(self) -> Callable[[_t.RetryCallState], float]:
        exponential = _t.wait_exponential(multiplier=self.initial_delay, exp_base=self.multiplier, max=self.max_delay)
        jitter, cap = self.jitter, self.max_delay

        def wait(state: _t.RetryCallState) -> float:
            return min(exponential(state) + random.uniform(0, jitter), cap)

        return wait


def ExponentialBackoff(  # noqa: N802 - reads as a policy name, like the spec says
    *,
    max_attempts: int = 3,
    initial: float = 1.0,
    maximum: float = 30.0,
    multiplier: float = 2.0,
    jitter: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    should_retry: Callable[[BaseException], bool] | None = None,
    sleep: SleepFunction | None = None,
) -> RetryPolicy:
    """Build a [`RetryPolicy`][pipekit.RetryPolicy] with exponential back-off.

    Args:
        max_attempts: Attempts in total, the first included.
        initial: Seconds before the second attempt.
        maximum: Upper bound for any one delay.
        multiplier: Growth factor per attempt.
        jitter: Up to this many random seconds added to each delay.
        retry_on: Exception classes worth retrying.
        should_retry: Optional extra predicate.
        sleep: The sleep function, for tests.

    Returns:
        The policy.
    """
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_delay=initial,
        max_delay=maximum,
        multiplier=multiplier,
        jitter=jitter,
        retry_on=retry_on,
        should_retry=should_retry,
        sleep=sleep,
    )


OnRetry = Callable[[int, float, BaseException], Awaitable[None]]


async def call_with_retry(
    policy: RetryPolicy,
    attempt: Callable[[int], Awaitable[T]],
    on_retry: OnRetry,
) -> T:
    """Run ``attempt(n)`` until it succeeds or the policy gives up.

    The first attempt runs without any retry machinery; tenacity is only set up
    once a retryable failure happened, so the common, successful case stays
    cheap. Cancellation is never caught.

    Args:
        policy: The retry policy.
        attempt: Called with the 1-based attempt number.
        on_retry: Awaited before each sleep with (failed attempt, delay, error).

    Returns:
        The successful attempt's result.

    Raises:
        Exception: The last attempt's error once the policy gives up.
    """
    try:
        return await attempt(1)
    except Exception as exc:
        if policy.max_attempts <= 1 or not policy.is_retryable(exc):
            raise
        first: BaseException | None = exc
        replayed = exc  # already judged retryable: a should_retry predicate sees each error once

    async def before_sleep(state: _t.RetryCallState) -> None:
        assert state.outcome is not None
        assert state.next_action is not None
        error = state.outcome.exception()
        assert error is not None
        await on_retry(state.attempt_number, state.next_action.sleep, error)

    retrying = _t.AsyncRetrying(
        stop=_t.stop_after_attempt(policy.max_attempts),
        wait=policy._wait(),
        retry=_t.retry_if_exception(lambda error: error is replayed or policy.is_retryable(error)),
        sleep=policy.sleep or anyio.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    result: Any = None
    async for manager in retrying:
        state = manager.retry_state
        if first is not None:
            # Replay the failure of the attempt made before tenacity existed.
            state.set_exception((type(first), first, first.__traceback__))
            first = None
            continue
        try:
            result = await attempt(state.attempt_number)
        except Exception as exc:
            state.set_exception((type(exc), exc, exc.__traceback__))
        else:
            state.set_result(result)
    return result  # type: ignore[no-any-return]

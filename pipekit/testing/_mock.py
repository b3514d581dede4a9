"""Mock stages that record what they saw, and a pipeline builder that swaps them in."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Self

import anyio
import attrs

from pipekit._context import StageContext
from pipekit._errors import PipelineDefinitionError, ValidationError
from pipekit._pipeline import Pipeline
from pipekit._stage import BaseStage

__all__ = ["Call", "MockStage", "MockStageError", "TestPipeline"]


class MockStageError(Exception):
    """The error a `MockStage` raises for its planned failures (``fail_times``)."""


@attrs.frozen(kw_only=True)
class Call:
    """What a mock stage saw when it was called.

    Attributes:
        sequence: Its place among all mock calls in the process (execute,
            rollback and validate alike): orders calls made at the same instant.
        pipeline: The pipeline being run.
        stage: The stage's name.
        attempt: The attempt (1-based); for a rollback, the attempts the stage
            took; for a validation, 1.
        request_id: The request being served.
        input: A copy of the request input.
        outputs: A copy of the outputs of the stages finished at that point.
        dry_run: Whether it was a dry run.
        time: ``anyio.current_time()`` at the call (virtual under a fake clock).
    """

    sequence: int
    pipeline: str
    stage: str
    attempt: int
    request_id: str
    input: Mapping[str, Any]
    outputs: Mapping[str, Any]
    dry_run: bool
    time: float


_sequence = itertools.count()


def _snapshot(ctx: StageContext) -> Call:
    return Call(
        sequence=next(_sequence),
        pipeline=ctx.pipeline,
        stage=ctx.stage,
        attempt=ctx.attempt,
        request_id=ctx.request.id,
        input=dict(ctx.input),
        outputs=dict(ctx.outputs),
        dry_run=ctx.dry_run,
        time=anyio.current_time(),
    )


def _as_exception(error: BaseException | type[BaseException] | str, kind: type[Exception]) -> BaseException:
    if isinstance(error, str):
        return kind(error)
    if isinstance(error, type):
        return error()
    return error


class MockStage(BaseStage):
    """A stage for tests: returns ``output``, fails when told to, and records every call.

    Args:
        name: The stage's name.
        output: What ``execute`` returns once it succeeds.
        error: What failing calls raise: an exception, its class, or a message
            for a `MockStageError`. Without ``fail_times`` every call raises it.
        fail_times: The first this-many calls fail (with ``error``, else a
            `MockStageError`), later ones succeed: for testing retries.
        delay: Seconds each call sleeps before finishing (on the fake clock
            when one is running).
        block: Each call waits, once it has started, until `release` is
            called: hold a stage open to cancel it, or to fill an engine.
            `wait_started` waits for a call to be in progress.
        rollback: Whether the stage can roll back (``False``: a stage without
            a rollback, so it is never compensated).
        rollback_error: Raised by ``rollback`` when given.
        rollback_delay: Seconds ``rollback`` sleeps first (``math.inf``: it hangs).
        validate_error: Raised by ``validate`` when given (a message becomes a
            `pipekit.ValidationError`).

    Attributes:
        calls: One `Call` per ``execute`` call, in order.
        rollbacks: One `Call` per ``rollback`` call.
        validations: One `Call` per ``validate`` call.
    """

    def __init__(
        self,
        name: str,
        *,
        output: Any = None,
        error: BaseException | type[BaseException] | str | None = None,
        fail_times: int = 0,
        delay: float = 0.0,
        block: bool = False,
        rollback: bool = True,
        rollback_error: BaseException | type[BaseException] | str | None = None,
        rollback_delay: float = 0.0,
        validate_error: BaseException | type[BaseException] | str | None = None,
    ) -> None:
        super().__init__(name)
        # rollback=False: pipekit sees no rollback at all (subclasses keep their class).
        self._pipekit_rolls_back = bool(rollback)
        if not isinstance(fail_times, int) or isinstance(fail_times, bool) or fail_times < 0:
            raise ValueError(f"MockStage fail_times must be an integer >= 0, got {fail_times!r}")
        for label, planned in (
            ("error", error),
            ("rollback_error", rollback_error),
            ("validate_error", validate_error),
        ):
            if not (
                planned is None
                or isinstance(planned, BaseException | str)
                or (isinstance(planned, type) and issubclass(planned, BaseException))
            ):
                raise TypeError(f"MockStage {label} must be an exception, its class or a message, got {planned!r}")
        for label, seconds in (("delay", delay), ("rollback_delay", rollback_delay)):
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not seconds >= 0:
                raise ValueError(f"MockStage {label} must be a number of seconds >= 0, got {seconds!r}")
        self.output = output
        self.error = error
        self.fail_times = fail_times
        self.delay = float(delay)
        self.block = bool(block)
        self._started: anyio.Event | None = None
        self._released: anyio.Event | None = None
        self.rollback_error = rollback_error
        self.rollback_delay = float(rollback_delay)
        self.validate_error = validate_error
        self.calls: list[Call] = []
        self.rollbacks: list[Call] = []
        self.validations: list[Call] = []

    @property
    def call_count(self) -> int:
        """How many times ``execute`` was called."""
        return len(self.calls)

    @property
    def rolled_back(self) -> bool:
        """Whether ``rollback`` was called at least once."""
        return bool(self.rollbacks)

    def _events(self) -> tuple[anyio.Event, anyio.Event]:
        # Made on first use, inside the event loop the test runs on.
        if self._started is None or self._released is None:
            self._started, self._released = anyio.Event(), anyio.Event()
        return self._started, self._released

    async def wait_started(self) -> None:
        """Wait until a call of this stage has started (for a ``block=True`` mock: is being held)."""
        await self._events()[0].wait()

    def release(self) -> None:
        """Let held (``block=True``) calls finish, now and from now on."""
        self._events()[1].set()

    @property
    def released(self) -> bool:
        """Whether `release` was called."""
        return self._events()[1].is_set()

    def reset(self) -> None:
        """Forget every recorded call (the failure plan starts over too)."""
        self.calls.clear()
        self.rollbacks.clear()
        self.validations.clear()
        self._started = self._released = None  # a held mock holds again

    async def execute(self, ctx: StageContext) -> Any:
        """Record the call, sleep ``delay``, then fail or return ``output`` as planned."""
        self.calls.append(_snapshot(ctx))
        started, released = self._events()
        started.set()
        if self.block:
            await released.wait()
        if self.delay:
            await anyio.sleep(self.delay)
        if self.fail_times:
            if len(self.calls) <= self.fail_times:
                if self.error is not None:
                    raise _as_exception(self.error, MockStageError)
                raise MockStageError(f"{self.name} failed as planned (call {len(self.calls)} of {self.fail_times})")
        elif self.error is not None:
            raise _as_exception(self.error, MockStageError)
        return self.output

    def validate(self, ctx: StageContext) -> None:
        """Record the call; raise ``validate_error`` when given."""
        self.validations.append(_snapshot(ctx))
        if self.validate_error is not None:
            raise _as_exception(self.validate_error, ValidationError)

    async def rollback(self, ctx: StageContext) -> None:
        """Record the call; raise ``rollback_error`` when given."""
        self.rollbacks.append(_snapshot(ctx))
        if self.rollback_delay:
            await anyio.sleep(self.rollback_delay)
        if self.rollback_error is not None:
            raise _as_exception(self.rollback_error, MockStageError)

    def __repr__(self) -> str:
        return f"<MockStage {self.name!r} calls={len(self.calls)} rollbacks={len(self.rollbacks)}>"


@attrs.frozen(eq=False, repr=False)
class TestPipeline(Pipeline):
    """A pipeline builder for tests, able to swap any stage for a `MockStage`.

    ``TestPipeline.from_pipeline(p).with_mock_stage("build", {"digest": "x"})``
    runs ``p`` with stage ``build`` replaced by a mock returning that output;
    the mock keeps the real stage's position, dependencies and policies.
    (Named ``Test...`` for the reader; pytest is told not to collect it.)
    """

    __test__ = False  # not a test class, despite the name

    atomic: bool = attrs.field(default=False, kw_only=True)
    partial_outputs: bool = attrs.field(default=True, kw_only=True)

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> TestPipeline:
        """A test pipeline with the same stages, policies and kind (atomic or not) as ``pipeline``."""
        if not isinstance(pipeline, Pipeline):
            raise TypeError(f"from_pipeline takes a pipekit.Pipeline, got {type(pipeline).__name__}")
        return cls(
            pipeline.name,
            entries=pipeline.entries,
            retry=pipeline.retry,
            timeout=pipeline.timeout,
            stage_timeout=pipeline.stage_timeout,
            rollback_enabled=pipeline.rollback_enabled,
            rollback_timeout=pipeline.rollback_timeout,
            hooks=pipeline.hooks,
            variables=pipeline.variables,
            validators=pipeline.validators,
            atomic=pipeline.serialised,
            partial_outputs=pipeline.keeps_partial_outputs,
        )

    @property
    def serialised(self) -> bool:
        return self.atomic

    @property
    def keeps_partial_outputs(self) -> bool:
        return self.partial_outputs

    def with_mock_stage(self, name: str, output_or_mock: Any = None) -> Self:
        """Replace stage ``name`` with a mock (given, or one returning ``output_or_mock``).

        Raises:
            PipelineDefinitionError: If there is no such stage, or a given
                mock has another name.
        """
        mock = output_or_mock if isinstance(output_or_mock, MockStage) else MockStage(name, output=output_or_mock)
        if mock.name != name:
            raise PipelineDefinitionError(f"mock for stage {name!r} is named {mock.name!r}")
        return self.replace_stage(name, mock)

    def mock(self, name: str) -> MockStage:
        """The mock standing in for stage ``name``.

        Raises:
            KeyError: If stage ``name`` is not a mock (or does not exist).
        """
        for entry in self.entries:
            if entry.name == name and isinstance(entry.stage, MockStage):
                return entry.stage
        raise KeyError(f"stage {name!r} of {self.name!r} is not a MockStage")

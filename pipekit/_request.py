"""Requests, responses and per-stage results: frozen values."""

from __future__ import annotations

import math
import types
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from ._errors import PipekitError
from ._status import Status

__all__ = ["PipelineRequest", "PipelineResponse", "RequestOptions", "StageResult"]


def _check_timeout(_inst: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a number of seconds > 0, got {value!r}")


def _freeze_input(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(f"request input must be a mapping, got {type(value).__name__}")
    return types.MappingProxyType(dict(value))


def _freeze_carrier(value: Mapping[str, str] | None) -> Mapping[str, str]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(f"request carrier must be a mapping of header names to values, got {type(value).__name__}")
    return types.MappingProxyType({str(k): str(v) for k, v in value.items()})


def _check_max_parallel(_inst: object, _attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"max_parallel must be an integer >= 1, got {value!r}")


def _new_id() -> str:
    return str(uuid.uuid4())


@attrs.frozen(kw_only=True)
class RequestOptions:
    """Per-request options.

    Args:
        timeout: Seconds the whole run may take; the tighter of this and the
            pipeline's own timeout wins.
        dry_run: Validate every stage without executing any.
        restore: Outputs of stages an earlier run completed, by stage name:
            those stages are not run again but count as succeeded with that
            output (``attempt`` 0, reason ``"restored from an earlier run"``),
            and are not rolled back by this run. Only top-level stages.
            `Engine.retry` fills it in from the run history.
        max_parallel: At most this many stages run at once in the whole run
            (nested pipelines' stages included; a stage keeps its slot
            through its retries, and a stage that runs a pipeline itself,
            ``inner.execute(ctx)``, runs it within its slot). None: no limit
            beyond the pipeline's own.
    """

    timeout: float | None = attrs.field(default=None, validator=_check_timeout)
    dry_run: bool = False
    restore: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_input, repr=False)
    max_parallel: int | None = attrs.field(default=None, validator=_check_max_parallel)


@attrs.frozen(kw_only=True)
class PipelineRequest:
    """One request to run a pipeline.

    Args:
        id: Unique id of this execution (a new UUID4 by default).
        type: A free-form label (e.g. ``"deploy"``), carried into events.
        input: Read-only input for the stages (``ctx.input``); copied.
        options: Timeout and dry-run options.
        carrier: W3C trace-context headers (``traceparent``, ``tracestate``)
            of the caller, for runs started from another process; the run's
            span becomes a child of that trace. Empty: the current span is
            the parent.
        metadata: Free-form string labels carried into `PipelineStarted`
            (``pipekit.trigger``, ``pipekit.retry_of`` and
            ``pipekit.definition`` are read by the run history).
    """

    id: str = attrs.field(factory=_new_id)
    type: str = ""
    input: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_input)
    options: RequestOptions = attrs.field(factory=RequestOptions)
    carrier: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_carrier)
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_carrier)


@attrs.frozen(kw_only=True)
class StageResult:
    """What happened to one stage of a run.

    Attributes:
        name: The stage's name.
        status: Its final state.
        output: What ``execute`` returned (None unless it succeeded).
        error: The exception the stage raised (or its timeout), if it failed.
        attempts: Attempts made (0 if it never started).
        started_at: When the first attempt started (UTC), if it started.
        finished_at: When it finished (UTC), if it started.
        duration: Seconds from start to finish (0.0 if it never started).
        rolled_back: Whether its rollback ran successfully.
        rollback_error: The error its rollback raised, if any.
        reason: Why it was skipped or cancelled, in words.
        start_index: Its place in the order stages started in this run
            (0 for the first), or None if it never started.
        rollback_index: Its place in the order rollbacks finished in this
            run, or None if it was not compensated.
    """

    name: str
    status: Status
    output: Any = None
    error: BaseException | None = None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration: float = 0.0
    rolled_back: bool = False
    rollback_error: BaseException | None = None
    reason: str | None = None
    start_index: int | None = None
    rollback_index: int | None = None


@attrs.frozen(kw_only=True)
class PipelineResponse:
    """The outcome of one run. Stage failures do not raise; they are described here.

    Attributes:
        id: The request id.
        pipeline: The pipeline's name.
        status: ``SUCCEEDED``, ``FAILED``, ``TIMED_OUT`` or ``CANCELLED``.
        stages: Per-stage results, in definition order.
        outputs: Outputs of the stages that succeeded (empty for a failed
            atomic pipeline).
        error: The run's error, if it did not succeed; rollback failures are on
            its ``rollback_error``.
        started_at: When the run started (UTC).
        finished_at: When it finished (UTC), rollback included.
        duration: Seconds from start to finish.
        hook_failures: How many hook calls raised during the run.
    """

    id: str
    pipeline: str
    status: Status
    stages: Mapping[str, StageResult]
    outputs: Mapping[str, Any]
    error: PipekitError | None
    started_at: datetime
    finished_at: datetime
    duration: float
    hook_failures: int = 0

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.status is Status.SUCCEEDED

    def raise_for_status(self) -> PipelineResponse:
        """Raise the run's error unless it succeeded.

        Returns:
            The response itself, for chaining.

        Raises:
            PipekitError: The run's error (``StageFailedError``,
                ``StageTimeoutError``, ``PipelineTimeoutError``,
                ``PipelineCancelledError`` or ``ValidationError``).
        """
        if self.error is not None:
            raise self.error
        return self

    def summary(self) -> str:
        """A readable per-stage report of the run, one line per stage."""
        lines = [f"pipeline {self.pipeline!r} {self.status.value} in {self.duration:.3f}s (request {self.id})"]
        width = max((len(n) for n in self.stages), default=0)
        for result in self.stages.values():
            detail = ""
            if result.error is not None:
                detail = f"  {type(result.error).__name__}: {result.error}"
            elif result.reason:
                detail = f"  ({result.reason})"
            if result.rollback_error is not None:
                detail += f"  rollback failed: {type(result.rollback_error).__name__}: {result.rollback_error}"
            tries = f"{result.attempts} attempt{'s' if result.attempts != 1 else ''}"
            lines.append(
                f"  {result.name:<{width}}  {result.status.value:<11}  {tries:<10}  {result.duration:7.3f}s{detail}"
            )
        if self.error is not None:
            lines.append(f"  error: {type(self.error).__name__}: {self.error}")
            if self.error.rollback_error is not None:
                lines.append(f"  rollback error: {self.error.rollback_error}")
        return "\n".join(lines)

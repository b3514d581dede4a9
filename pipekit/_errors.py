"""The pipekit error family.

Every error pipekit raises on purpose derives from [`PipekitError`][pipekit.PipekitError]::

    PipekitError
    ├── PipelineDefinitionError (also ValueError)   bad pipeline built in code
    ├── ValidationError (also ValueError)           a stage's validate() said no
    ├── ContextConflictError                        two concurrent stages wrote one key
    ├── StageFailedError                            a stage failed after its attempts
    │   └── StageTimeoutError (also TimeoutError)   an attempt exceeded its timeout
    ├── PipelineTimeoutError (also TimeoutError)    the whole run exceeded its deadline
    ├── PipelineCancelledError                      the run was cancelled
    ├── RollbackTimeoutError (also TimeoutError)    a compensation ran out of time
    └── RollbackError (also ExceptionGroup)         one or more compensations failed

Errors carry their context as attributes (``.stage``, ``.attempts``,
``.request_id``) and keep the original exception as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ContextConflictError",
    "PipekitError",
    "PipelineCancelledError",
    "PipelineDefinitionError",
    "PipelineTimeoutError",
    "RollbackError",
    "RollbackTimeoutError",
    "StageFailedError",
    "StageTimeoutError",
    "ValidationError",
]


class PipekitError(Exception):
    """Root of every error pipekit raises on purpose.

    Attributes:
        rollback_error: Set on a run's error when compensating the completed
            stages failed too; the original failure stays the error itself.
    """

    rollback_error: RollbackError | None = None


class PipelineDefinitionError(PipekitError, ValueError):
    """A pipeline was built wrongly: duplicate names, unknown dependencies, cycles."""


class ValidationError(PipekitError, ValueError):
    """A stage (or several, in a dry run) rejected the request before executing.

    Raise it from a stage's ``validate`` method with a message naming the
    problem. When pipekit aggregates several problems (a dry run reports all of
    them at once), the individual errors are in `errors`.

    Args:
        message: What is wrong, in one line.
        stage: The stage that rejected the request, when known.
        errors: The individual problems, when this error aggregates several.
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        errors: Sequence[ValidationError] = (),
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.errors: tuple[ValidationError, ...] = tuple(errors)


class ContextConflictError(PipekitError):
    """Two stages that may run concurrently wrote the same context key.

    Args:
        key: The key's name.
        stage: The stage whose write was refused.
        other: The stage that wrote the key first.
    """

    def __init__(self, key: str, *, stage: str, other: str) -> None:
        super().__init__(
            f"context key {key!r} written by stage {stage!r} was already written by "
            f"stage {other!r}, which may run concurrently with it; use separate keys "
            "or make one stage depend on the other"
        )
        self.key = key
        self.stage = stage
        self.other = other


class StageFailedError(PipekitError):
    """A stage failed; the original exception is ``__cause__``.

    Args:
        stage: The failed stage's name.
        attempts: How many attempts were made.
        message: Overrides the generated message.
    """

    def __init__(self, stage: str, *, attempts: int, message: str | None = None) -> None:
        if message is None:
            plural = "attempt" if attempts == 1 else "attempts"
            message = f"stage {stage!r} failed after {attempts} {plural}"
        super().__init__(message)
        self.stage = stage
        self.attempts = attempts


class StageTimeoutError(StageFailedError, TimeoutError):
    """An attempt of a stage ran longer than the stage's timeout.

    Args:
        stage: The stage's name.
        timeout: The per-attempt limit in seconds.
        attempts: How many attempts were made.
    """

    def __init__(self, stage: str, *, timeout: float, attempts: int = 1) -> None:
        super().__init__(
            stage,
            attempts=attempts,
            message=f"stage {stage!r} timed out after {timeout:g}s (attempt {attempts})",
        )
        self.timeout = timeout


class PipelineTimeoutError(PipekitError, TimeoutError):
    """The whole run exceeded its deadline (pipeline or request timeout).

    Args:
        pipeline: The pipeline's name.
        timeout: The limit in seconds.
        request_id: The request's id.
    """

    def __init__(self, pipeline: str, *, timeout: float, request_id: str) -> None:
        super().__init__(f"pipeline {pipeline!r} timed out after {timeout:g}s")
        self.pipeline = pipeline
        self.timeout = timeout
        self.request_id = request_id


class PipelineCancelledError(PipekitError):
    """The run was cancelled (``handle.cancel()`` or the engine shutting down).

    Args:
        pipeline: The pipeline's name.
        request_id: The request's id.
    """

    def __init__(self, pipeline: str, *, request_id: str) -> None:
        super().__init__(f"pipeline {pipeline!r} was cancelled")
        self.pipeline = pipeline
        self.request_id = request_id


class RollbackTimeoutError(PipekitError, TimeoutError):
    """A stage's rollback did not finish (or never started) within the rollback timeout.

    Args:
        stage: The stage whose rollback ran out of time.
        timeout: The rollback timeout in seconds.
        waiting_for: The stages whose rollbacks it was still waiting for, if
            it never started.
    """

    def __init__(self, stage: str, *, timeout: float, waiting_for: Sequence[str] = ()) -> None:
        if waiting_for:
            message = (
                f"rollback of stage {stage!r} did not start within the {timeout:g}s rollback timeout: "
                f"it was waiting for the rollback of {', '.join(map(repr, waiting_for))}"
            )
        else:
            message = f"rollback of stage {stage!r} did not finish within the {timeout:g}s rollback timeout"
        super().__init__(message)
        self.stage = stage
        self.timeout = timeout
        self.waiting_for = tuple(waiting_for)


class RollbackError(PipekitError, ExceptionGroup[Exception]):
    """One or more compensations failed; the individual errors are ``.exceptions``.

    It is attached to the pipeline's error (``response.error.rollback_error``)
    and never replaces it: the original failure stays what the run reports.
    """

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> RollbackError:
        return super().__new__(cls, message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> RollbackError:  # type: ignore[override]
        return RollbackError(self.message, excs)

"""Events every execution emits, in order, to the engine's subscribers and hooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ._status import Status

#: Seconds one hook call may take before it counts as failed (the default).
DEFAULT_HOOK_TIMEOUT = 30.0

__all__ = [
    "DEFAULT_HOOK_TIMEOUT",
    "Event",
    "PipelineFinished",
    "PipelineStarted",
    "RollbackFinished",
    "RollbackStarted",
    "StageCancelled",
    "StageFailed",
    "StageRetrying",
    "StageRollbackFailed",
    "StageRolledBack",
    "StageSkipped",
    "StageStarted",
    "StageSucceeded",
]


@attrs.frozen(kw_only=True)
class Event:
    """Base of all events.

    Attributes:
        request_id: The execution's request id.
        pipeline: The pipeline's name (the inner one, for nested pipelines).
        timestamp: Seconds since the epoch when it happened.
        stage: The stage concerned, for stage events.
        attempt: The attempt concerned (0 when not about an attempt).
        error: The error concerned, for failure events.
    """

    kind: ClassVar[str] = "event"

    request_id: str
    pipeline: str
    timestamp: float
    stage: str | None = None
    attempt: int = 0
    error: BaseException | None = None


@attrs.frozen(kw_only=True)
class PipelineStarted(Event):
    """A run started. ``request_type`` is the request's ``type``, ``input`` its input, ``metadata`` its metadata.

    ``dry_run`` says whether it is a dry run (nothing executes).

    ``parent`` names the pipeline this one is nested in (None for the run a
    caller started).
    """

    kind: ClassVar[str] = "pipeline_started"
    request_type: str = ""
    parent: str | None = None
    input: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    metadata: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    dry_run: bool = False


@attrs.frozen(kw_only=True)
class StageStarted(Event):
    """A stage's first attempt started."""

    kind: ClassVar[str] = "stage_started"


@attrs.frozen(kw_only=True)
class StageRetrying(Event):
    """Attempt ``attempt`` failed with ``error``; the next one starts after ``delay`` seconds."""

    kind: ClassVar[str] = "stage_retrying"
    delay: float = 0.0


@attrs.frozen(kw_only=True)
class StageSucceeded(Event):
    """A stage succeeded on attempt ``attempt`` after ``duration`` seconds, returning ``output``.

    ``restored`` stages did not run: their output was recorded by an earlier
    run (``RequestOptions(restore=...)``, ``Engine.retry(from_failed=True)``);
    ``attempt`` is then 0.
    """

    kind: ClassVar[str] = "stage_succeeded"
    duration: float = 0.0
    output: Any = attrs.field(default=None, repr=False)
    restored: bool = False


@attrs.frozen(kw_only=True)
class StageFailed(Event):
    """A stage failed (``status`` is FAILED or TIMED_OUT) after ``attempt`` attempts."""

    kind: ClassVar[str] = "stage_failed"
    status: Status = Status.FAILED
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class StageCancelled(Event):
    """A running stage was interrupted (fail-fast, run timeout or cancellation)."""

    kind: ClassVar[str] = "stage_cancelled"
    status: Status = Status.CANCELLED
    reason: str = ""


@attrs.frozen(kw_only=True)
class StageSkipped(Event):
    """A stage did not run; ``reason`` says why."""

    kind: ClassVar[str] = "stage_skipped"
    reason: str = ""


@attrs.frozen(kw_only=True)
class RollbackStarted(Event):
    """Compensation started for ``stages`` (those that completed and can roll back)."""

    kind: ClassVar[str] = "rollback_started"
    stages: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class StageRolledBack(Event):
    """A stage's rollback succeeded."""

    kind: ClassVar[str] = "stage_rolled_back"


@attrs.frozen(kw_only=True)
class StageRollbackFailed(Event):
    """A stage's rollback raised ``error`` (or did not finish in time)."""

    kind: ClassVar[str] = "stage_rollback_failed"


@attrs.frozen(kw_only=True)
class RollbackFinished(Event):
    """Compensation finished; ``failed`` rollbacks raised."""

    kind: ClassVar[str] = "rollback_finished"
    rolled_back: int = 0
    failed: int = 0


@attrs.frozen(kw_only=True)
class PipelineFinished(Event):
    """A run finished with ``status`` after ``duration`` seconds (rollback included).

    ``parent`` names the pipeline this one is nested in (None for the run a
    caller started).
    """

    kind: ClassVar[str] = "pipeline_finished"
    status: Status = Status.SUCCEEDED
    duration: float = 0.0
    parent: str | None = None

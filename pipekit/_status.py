"""Run and stage states."""

from __future__ import annotations

import enum

__all__ = ["Status"]


class Status(enum.StrEnum):
    """The state of a run or of one stage in it.

    A run ends ``SUCCEEDED``, ``FAILED``, ``TIMED_OUT`` or ``CANCELLED``. A stage
    additionally ends ``SKIPPED`` (its condition was false, a dependency failed
    with ``continue_on_error``, or the run stopped before it started) or
    ``ROLLED_BACK`` (it succeeded, then was compensated after a later failure).
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        """Whether this is a final state."""
        return self not in (Status.PENDING, Status.RUNNING)

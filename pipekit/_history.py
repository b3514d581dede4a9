"""What the engine needs of a run history (`pipekit.store` implements it)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from ._pipeline import Hook

__all__ = ["RecordedRun", "RecordedStage", "RunStore", "restorable_outputs", "reusable"]


class RecordedStage(Protocol):
    """One stage of a recorded run, as `Engine.retry` reads it."""

    @property
    def stage(self) -> str:
        """The stage's name (nested stages' names are qualified)."""
        ...

    @property
    def status(self) -> Any:
        """Its final status (a `pipekit.Status` or its value)."""
        ...

    @property
    def rollback_status(self) -> str | None:
        """None unless the run rolled it back (or tried to)."""
        ...

    @property
    def output(self) -> Any:
        """Its recorded output."""
        ...

    @property
    def output_restorable(self) -> bool:
        """Whether ``output`` is the output itself (it was JSON-serialisable)."""
        ...


class RecordedRun(Protocol):
    """A recorded execution, as `Engine.retry` reads it."""

    @property
    def id(self) -> str:
        """The run's id in the history."""
        ...

    @property
    def pipeline(self) -> str:
        """The pipeline's name."""
        ...

    @property
    def input(self) -> Mapping[str, Any]:
        """The request input."""
        ...

    @property
    def input_restorable(self) -> bool:
        """Whether ``input`` is the input itself (it was JSON-serialisable)."""
        ...

    @property
    def stages(self) -> Sequence[RecordedStage]:
        """Its stages."""
        ...


@runtime_checkable
class RunStore(Protocol):
    """A run history an [`Engine`][pipekit.Engine] records into and retries from."""

    def recorder(self) -> AbstractAsyncContextManager[Hook]:
        """A context whose value is a hook recording every run it is given the events of.

        An [`Engine`][pipekit.Engine] enters it on entering and leaves it once
        every execution has ended, also when the engine's owner is cancelled:
        leaving writes what it holds, and must shield (and bound) that final
        write itself.
        """
        ...

    async def get_run(self, run_id: str) -> RecordedRun:
        """The recorded run ``run_id`` (raises `LookupError` when unknown)."""
        ...


def reusable(stage: RecordedStage) -> bool:
    """Whether a retry may skip ``stage`` and restore its output instead.

    True when it succeeded, was not compensated afterwards, and its output
    was recorded as itself.
    """
    status = getattr(stage.status, "value", stage.status)
    return status == "succeeded" and stage.rollback_status is None and stage.output_restorable


def restorable_outputs(record: RecordedRun, names: Collection[str] | None = None) -> dict[str, Any]:
    """The outputs of ``record``'s `reusable` top-level stages (those in ``names``, when given)."""
    return {
        s.stage: s.output
        for s in record.stages
        if "/" not in s.stage and (names is None or s.stage in names) and reusable(s)
    }

"""What the engine needs of a run history (`pipekit.store` implements it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from ._pipeline import Hook

__all__ = ["RecordedRun", "RecordedStage", "RunStore"]


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

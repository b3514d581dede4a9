"""Typed keys and the per-stage view of a run ([`StageContext`][pipekit.StageContext])."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import structlog
from opentelemetry import trace

from ._errors import ContextConflictError
from ._events import Event

if TYPE_CHECKING:
    from ._request import PipelineRequest

__all__ = ["Key", "StageContext"]

T = TypeVar("T")
D = TypeVar("D")
E = TypeVar("E", bound=Event)

_MISSING: Any = object()


class Key(Generic[T]):
    """A typed name for a value stages share through the context.

    ``Key[int]("retries")`` lets mypy infer ``int`` from ``ctx[key]``. Two keys
    with the same name address the same value.

    Args:
        name: The value's name; shown in errors.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Key name must be a non-empty string, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("pipekit.Key", self.name))


class _Store:
    """The values a run's stages share; remembers which stage wrote each one.

    A nested pipeline gets a child store: it reads through to its parent and
    its writes are merged into the parent, as the nesting stage's, when it
    succeeds.
    """

    __slots__ = ("concurrent", "parent", "values", "writers")

    def __init__(self, concurrent: Callable[[str, str], bool], parent: _Store | None = None) -> None:
        self.values: dict[str, Any] = {}
        self.writers: dict[str, str] = {}
        self.concurrent = concurrent
        self.parent = parent

    def lookup(self, name: str) -> Any:
        store: _Store | None = self
        while store is not None:
            value = store.values.get(name, _MISSING)
            if value is not _MISSING:
                return value
            store = store.parent
        return _MISSING

    def write(self, name: str, value: Any, stage: str) -> None:
        other = self.writers.get(name)
        if other is not None and other != stage and self.concurrent(other, stage):
            raise ContextConflictError(name, stage=stage, other=other)
        self.values[name] = value
        self.writers[name] = stage

    def merge_into_parent(self, stage: str) -> None:
        parent = self.parent
        if parent is None:  # pragma: no cover - only child stores are merged
            return
        # All or nothing: check every key before writing any.
        for name in self.values:
            other = parent.writers.get(name)
            if other is not None and other != stage and parent.concurrent(other, stage):
                raise ContextConflictError(name, stage=stage, other=other)
        for name, value in self.values.items():
            parent.write(name, value, stage)


class _RunView:
    """What a context needs from its run (implemented by the runner)."""

    __slots__ = ()
    pipeline_name: str
    request: PipelineRequest
    store: _Store
    outputs_view: Mapping[str, Any]
    dry_run: bool
    variables: Mapping[str, Any]
    emitter: Any  # the run's event emitter, or None when nobody listens

    def wall_time(self) -> float:
        """Seconds since the epoch now, on the clock the run's own events use."""
        return time.time()


def _key_name(key: Key[Any] | str) -> str:
    if isinstance(key, Key):
        return key.name
    if isinstance(key, str):
        return key
    raise TypeError(f"context keys are pipekit.Key or str, got {type(key).__name__}")


class StageContext:
    """What a stage sees of the run it is part of.

    One context is made per stage; values set with ``ctx[key] = value`` are
    visible to the stages that run after it. Stages that may run concurrently
    (no dependency path between them) cannot write the same key:
    [`ContextConflictError`][pipekit.ContextConflictError].
    """

    __slots__ = ("_attempt", "_log", "_run", "_span", "_stage")

    def __init__(self, run: _RunView, stage: str, attempt: int = 1) -> None:
        self._run = run
        self._stage = stage
        self._attempt = attempt
        self._log: Any = None
        self._span: Any = None  # the stage's (or current attempt's) span, set by the runner when traced

    @overload
    def __getitem__(self, key: Key[T]) -> T: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: Key[Any] | str) -> Any:
        name = _key_name(key)
        value = self._run.store.lookup(name)
        if value is _MISSING:
            raise KeyError(f"context key {name!r} is not set (stage {self._stage!r})")
        return value

    @overload
    def __setitem__(self, key: Key[T], value: T) -> None: ...
    @overload
    def __setitem__(self, key: str, value: Any) -> None: ...
    def __setitem__(self, key: Key[Any] | str, value: Any) -> None:
        self._run.store.write(_key_name(key), value, self._stage)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, Key | str):
            return False
        return self._run.store.lookup(_key_name(key)) is not _MISSING

    @overload
    def get(self, key: Key[T]) -> T | None: ...
    @overload
    def get(self, key: Key[T], default: D) -> T | D: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: Key[Any] | str, default: Any = None) -> Any:
        """Return the key's value, or ``default`` when it is unset."""
        value = self._run.store.lookup(_key_name(key))
        return default if value is _MISSING else value

    @property
    def request(self) -> PipelineRequest:
        """The request this run is serving."""
        return self._run.request

    @property
    def input(self) -> Mapping[str, Any]:
        """The request's input (read-only)."""
        return self._run.request.input

    @property
    def outputs(self) -> Mapping[str, Any]:
        """Outputs of the stages that have finished so far, by stage name (read-only)."""
        return self._run.outputs_view

    @property
    def variables(self) -> Mapping[str, Any]:
        """The pipeline's variables (`Pipeline.with_variables`), read-only."""
        return self._run.variables

    async def emit(self, event_type: type[E], /, **fields: Any) -> None:
        """Send an event of ``event_type`` to this run's subscribers and hooks.

        ``request_id``, ``pipeline``, ``timestamp``, ``stage`` and ``attempt``
        are filled in; ``fields`` gives the rest. It costs nothing when nobody
        listens. `pipekit.ci` streams command output this way
        (`pipekit.ci.OutputLine`).

        Raises:
            TypeError: If ``event_type`` is not a `pipekit.Event` subclass.
        """
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise TypeError(f"ctx.emit() takes a pipekit.Event subclass, got {event_type!r}")
        emitter = self._run.emitter
        if emitter is None:
            return
        run = self._run
        await emitter.emit(
            event_type(
                request_id=run.request.id,
                pipeline=run.pipeline_name,
                timestamp=run.wall_time(),
                stage=self._stage,
                attempt=self._attempt,
                **fields,
            )
        )

    @property
    def stage(self) -> str:
        """The name of the stage this context belongs to."""
        return self._stage

    @property
    def pipeline(self) -> str:
        """The name of the pipeline being run."""
        return self._run.pipeline_name

    @property
    def attempt(self) -> int:
        """The current attempt, starting at 1."""
        return self._attempt

    @property
    def dry_run(self) -> bool:
        """Whether this is a dry run (stages are validated, never executed)."""
        return self._run.dry_run

    @property
    def log(self) -> Any:
        """A structlog logger bound with ``request_id``, ``pipeline``, ``stage`` and ``attempt``.

        Inside a traced run it also carries the ``trace_id`` and ``span_id``
        of the stage's span, so log lines and traces join up.
        """
        log = self._log
        if log is None:
            log = structlog.get_logger("pipekit").bind(
                request_id=self._run.request.id,
                pipeline=self._run.pipeline_name,
                stage=self._stage,
                attempt=self._attempt,
            )
            span = self._span if self._span is not None else trace.get_current_span()
            span_context = span.get_span_context()
            if span_context.is_valid:
                log = log.bind(trace_id=f"{span_context.trace_id:032x}", span_id=f"{span_context.span_id:016x}")
            self._log = log
        return log

    def __repr__(self) -> str:
        return (
            f"<StageContext pipeline={self._run.pipeline_name!r} stage={self._stage!r} "
            f"attempt={self._attempt} request={self._run.request.id!r}>"
        )

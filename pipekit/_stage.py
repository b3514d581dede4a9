"""The stage protocols, [`BaseStage`][pipekit.BaseStage] and the [`stage`][pipekit.stage] decorator."""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, overload, runtime_checkable

import attrs

from ._context import StageContext

__all__ = ["BaseStage", "FunctionStage", "RollsBack", "Stage", "Validates", "stage"]

StageFunction = Callable[[StageContext], Awaitable[Any]]
RollbackFunction = Callable[[StageContext], Awaitable[None]]
ValidateFunction = Callable[[StageContext], None]


@runtime_checkable
class Stage(Protocol):
    """A unit of work in a pipeline: a name and an async ``execute``.

    ``execute`` returns the stage's output, which later stages read from
    ``ctx.outputs[name]``. Raising fails the stage.
    """

    @property
    def name(self) -> str:
        """The stage's name, unique within its pipeline."""
        ...

    async def execute(self, ctx: StageContext) -> Any:
        """Do the stage's work and return its output."""
        ...


@runtime_checkable
class Validates(Protocol):
    """A stage that checks its inputs before it runs (and in dry runs)."""

    def validate(self, ctx: StageContext) -> None:
        """Raise [`ValidationError`][pipekit.ValidationError] when the stage cannot run."""
        ...


@runtime_checkable
class RollsBack(Protocol):
    """A stage that can undo its effects after a later failure."""

    async def rollback(self, ctx: StageContext) -> None:
        """Compensate what a successful ``execute`` did."""
        ...


class BaseStage(abc.ABC):
    """A convenient base for class-based stages, with no-op ``validate`` and ``rollback``.

    Set ``name`` as a class attribute or pass it to ``__init__``::

        class Migrate(pk.BaseStage):
            name = "migrate"

            async def execute(self, ctx): ...
            async def rollback(self, ctx): ...
    """

    name: str

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    @abc.abstractmethod
    async def execute(self, ctx: StageContext) -> Any:
        """Do the stage's work and return its output."""

    def validate(self, ctx: StageContext) -> None:  # noqa: B027 - deliberately a no-op
        """Check the stage can run; the default accepts everything."""

    async def rollback(self, ctx: StageContext) -> None:  # noqa: B027 - deliberately a no-op
        """Undo the stage's effects; the default does nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


@attrs.frozen(kw_only=True)
class FunctionStage:
    """A stage made from an async function by [`stage`][pipekit.stage]."""

    name: str
    fn: StageFunction = attrs.field(repr=False)
    rollback_fn: RollbackFunction | None = attrs.field(default=None, repr=False)
    validate_fn: ValidateFunction | None = attrs.field(default=None, repr=False)

    async def execute(self, ctx: StageContext) -> Any:
        """Call the wrapped function."""
        return await self.fn(ctx)


def _make(
    fn: StageFunction,
    name: str | None,
    rollback: RollbackFunction | None,
    validate: ValidateFunction | None,
) -> FunctionStage:
    if not _is_async_callable(fn):
        raise TypeError(
            f"@pipekit.stage needs an async function (async def ...), got {getattr(fn, '__qualname__', fn)!r}"
        )
    for label, extra in (("rollback", rollback), ("validate", validate)):
        if extra is not None and not callable(extra):
            raise TypeError(f"@pipekit.stage {label}= takes a function, got {extra!r}")
    if rollback is not None and not _is_async_callable(rollback):
        raise TypeError(
            f"@pipekit.stage rollback= needs an async function, got {getattr(rollback, '__qualname__', rollback)!r}"
        )
    return FunctionStage(
        name=name if name is not None else getattr(fn, "__name__", repr(fn)),
        fn=fn,
        rollback_fn=rollback,
        validate_fn=validate,
    )


@overload
def stage(fn: StageFunction, /) -> FunctionStage: ...
@overload
def stage(
    *,
    name: str | None = None,
    rollback: RollbackFunction | None = None,
    validate: ValidateFunction | None = None,
) -> Callable[[StageFunction], FunctionStage]: ...
def stage(
    fn: StageFunction | None = None,
    /,
    *,
    name: str | None = None,
    rollback: RollbackFunction | None = None,
    validate: ValidateFunction | None = None,
) -> FunctionStage | Callable[[StageFunction], FunctionStage]:
    """Turn an async function ``(ctx) -> output`` into a stage.

    Use it bare (``@pk.stage``; the name is the function's) or with options::

        async def undo(ctx): ...

        @pk.stage(name="create-user", rollback=undo)
        async def create_user(ctx): ...

    Args:
        fn: The function, when used bare.
        name: The stage's name; defaults to the function's name.
        rollback: An async function ``(ctx) -> None`` compensating the stage.
        validate: A function ``(ctx) -> None`` raising
            [`ValidationError`][pipekit.ValidationError] when the stage cannot run.

    Returns:
        The stage, or a decorator making one.
    """
    if fn is not None:
        return _make(fn, name, rollback, validate)

    def decorate(f: StageFunction) -> FunctionStage:
        return _make(f, name, rollback, validate)

    return decorate


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def find_validate(stage: object) -> ValidateFunction | None:
    """Return the stage's validate callable, or None when it has none worth calling."""
    if isinstance(stage, FunctionStage):
        return stage.validate_fn
    if _inherits_noop(stage, "validate"):
        return None
    fn = getattr(stage, "validate", None)
    return fn if callable(fn) else None


def find_rollback(stage: object) -> RollbackFunction | None:
    """Return the stage's rollback callable, or None when it has none worth calling."""
    if isinstance(stage, FunctionStage):
        return stage.rollback_fn
    if _inherits_noop(stage, "rollback") or getattr(stage, "_pipekit_rolls_back", True) is False:
        return None
    fn = getattr(stage, "rollback", None)
    return fn if callable(fn) else None


def _inherits_noop(stage: object, attr: str) -> bool:
    # True when the method the stage would use is BaseStage's no-op (inherited,
    # or re-assigned by a subclass to opt out of a parent's implementation).
    for klass in type(stage).__mro__:
        if attr in klass.__dict__:
            return klass.__dict__[attr] is BaseStage.__dict__[attr]
    return False

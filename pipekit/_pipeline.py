"""Pipelines: immutable compositions of stages, built fluently."""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self, overload, runtime_checkable

import attrs

from ._context import StageContext
from ._errors import PipelineDefinitionError, ValidationError
from ._events import DEFAULT_HOOK_TIMEOUT, Event
from ._plan import Condition, Entry, Plan, compile_plan, find_cycle, resolve_dependencies
from ._policy import RetryPolicy
from ._request import PipelineRequest, PipelineResponse

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ._stage import Stage

__all__ = ["AtomicPipeline", "Hook", "Pipeline", "Validator", "WorkflowPipeline"]

#: An async callable receiving every event of a run.
Hook = Callable[[Event], Awaitable[Any]]


@runtime_checkable
class Validator(Protocol):
    """A pre-flight check attached with [`Pipeline.with_validators`][pipekit.Pipeline.with_validators].

    Every validator of a pipeline (nested pipelines' included) runs before any
    stage starts, and in dry runs. ``validate`` raises
    [`ValidationError`][pipekit.ValidationError] (with ``errors=[...]`` to
    report several problems at once); the run then fails with every problem
    listed and no stage executes.
    """

    async def validate(self, ctx: StageContext) -> None:
        """Raise `ValidationError` naming each problem found."""
        ...


def _check_seconds(what: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value <= 0:
        raise PipelineDefinitionError(f"{what} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _check_stage(stage: object) -> Stage:
    if isinstance(stage, type):
        raise PipelineDefinitionError(
            f"add an instance of the stage, not the class: {stage.__name__}() rather than {stage.__name__}"
        )
    name = getattr(stage, "name", None)
    if not isinstance(name, str) or not name:
        raise PipelineDefinitionError(f"a stage needs a non-empty string name, got {stage!r}")
    if not callable(getattr(stage, "execute", None)):
        raise PipelineDefinitionError(f"stage {name!r} has no execute(ctx) method")
    return stage  # type: ignore[return-value]


def _check_depends_on(name: str, depends_on: Iterable[str] | None) -> tuple[str, ...] | None:
    if depends_on is None:
        return None
    if isinstance(depends_on, str):
        depends_on = (depends_on,)
    deps = tuple(depends_on)
    for d in deps:
        if not isinstance(d, str):
            raise PipelineDefinitionError(f"stage {name!r}: depends_on takes stage names, got {d!r}")
    if name in deps:
        raise PipelineDefinitionError(f"stage {name!r} depends on itself: {name} -> {name}")
    return deps


def _seconds_field(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    _check_seconds(f"Pipeline {attribute.name}", value)


def _check_retry(_inst: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, RetryPolicy):
        raise PipelineDefinitionError(f"a pipeline's retry must be a pipekit.RetryPolicy, got {value!r}")


def _check_hooks(_inst: object, _attribute: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
    for hook in value:
        if not callable(hook):
            raise PipelineDefinitionError(f"hooks must be async callables, got {hook!r}")


def _to_entries(value: Iterable[Entry]) -> tuple[Entry, ...]:
    return tuple(value)


def _to_variables(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value))


def _check_variables(_inst: object, _attribute: attrs.Attribute[Any], value: Mapping[str, Any]) -> None:
    for k in value:
        if not isinstance(k, str) or not k.isidentifier():
            raise PipelineDefinitionError(f"variable names must be identifiers (letters, digits, _), got {k!r}")


def _check_validators(_inst: object, _attribute: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
    for v in value:
        if not isinstance(v, Validator) or isinstance(v, type) or not inspect.iscoroutinefunction(v.validate):
            raise PipelineDefinitionError(f"validators need an async validate(ctx) method, got {v!r}")


def _to_validators(value: Iterable[Validator]) -> tuple[Validator, ...]:
    return tuple(value)


def _to_hooks(value: Iterable[Hook]) -> tuple[Hook, ...]:
    return tuple(value)


def _check_entries(_inst: object, _attribute: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
    for entry in value:
        if not isinstance(entry, Entry):
            raise PipelineDefinitionError(f"add stages with add_stage() and friends, not entries= ({entry!r})")


def make_request(
    pipeline: object,
    request: object,
    input: Mapping[str, Any] | None,  # noqa: A002 - the documented name
    caller: str,
) -> PipelineRequest:
    """Check what a caller passed to run a pipeline, and build the request.

    Raises:
        TypeError: Naming the mistake (a stage instead of a pipeline, a dict
            instead of a request, both a request and ``input=``).
    """
    if not isinstance(pipeline, Pipeline):
        hint = ""
        if callable(getattr(pipeline, "execute", None)):
            hint = "; wrap a single stage with pk.Pipeline('name').add_stage(stage)"
        raise TypeError(f"{caller} takes a pipekit.Pipeline, got {type(pipeline).__name__}{hint}")
    if request is None:
        return PipelineRequest(input=input or {})
    if input is not None:
        raise TypeError(f"{caller}: pass either a request or input=, not both")
    if not isinstance(request, PipelineRequest):
        hint = "; pass a plain mapping as input=..." if isinstance(request, Mapping) else ""
        raise TypeError(f"{caller} takes a pipekit.PipelineRequest, got {type(request).__name__}{hint}")
    return request


@attrs.frozen(eq=False)
class Pipeline:
    """An immutable composition of stages; every builder method returns a new pipeline.

    By default each stage (or parallel group) depends on the one added just
    before it; ``depends_on`` names exact dependencies instead and
    ``depends_on=()`` makes a root, so every pipeline is a DAG whose
    independent stages run concurrently. A pipeline is itself a stage: add one
    to another to nest it.

    Args:
        name: The pipeline's name (also its stage name when nested).
    """

    name: str
    entries: tuple[Entry, ...] = attrs.field(default=(), kw_only=True, converter=_to_entries, validator=_check_entries)
    retry: RetryPolicy | None = attrs.field(default=None, kw_only=True, validator=_check_retry)
    timeout: float | None = attrs.field(default=None, kw_only=True, validator=_seconds_field)
    stage_timeout: float | None = attrs.field(default=None, kw_only=True, validator=_seconds_field)
    rollback_enabled: bool = attrs.field(default=True, kw_only=True, converter=bool)
    rollback_timeout: float = attrs.field(default=60.0, kw_only=True, validator=_seconds_field)
    hooks: tuple[Hook, ...] = attrs.field(default=(), kw_only=True, converter=_to_hooks, validator=_check_hooks)
    variables: Mapping[str, Any] = attrs.field(
        factory=dict, kw_only=True, converter=_to_variables, validator=_check_variables
    )
    validators: tuple[Validator, ...] = attrs.field(
        default=(), kw_only=True, converter=_to_validators, validator=_check_validators
    )
    _plan: Plan | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PipelineDefinitionError(f"a pipeline needs a non-empty string name, got {self.name!r}")

    # -- building ---------------------------------------------------------

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages' names, in the order they were added."""
        return tuple(e.name for e in self.entries)

    def _next_group(self) -> int:
        return self.entries[-1].group + 1 if self.entries else 0

    def _with_entries(self, new: Sequence[Entry]) -> Self:
        names = set(self.stage_names)
        for e in new:
            if e.stage is self:
                raise PipelineDefinitionError(f"pipeline {self.name!r} cannot contain itself")
            if e.name in names:
                raise PipelineDefinitionError(
                    f"stage name {e.name!r} is used twice in pipeline {self.name!r}; stage names must be unique"
                )
            names.add(e.name)
            if isinstance(e.stage, Pipeline):
                e.stage.plan()  # a broken inner pipeline is rejected where it is added
        entries = (*self.entries, *new)
        # A dependency cycle needs a forward reference; catch it when the
        # stage that closes it is added.
        added = {e.name for e in new}
        if any(d in added for e in self.entries if e.depends_on for d in e.depends_on):
            cycle = find_cycle(resolve_dependencies(entries))
            if cycle is not None:
                raise PipelineDefinitionError(f"pipeline {self.name!r} has a dependency cycle: {' -> '.join(cycle)}")
        return attrs.evolve(self, entries=entries)

    def _entry(
        self,
        stage: Stage,
        group: int,
        *,
        retry: RetryPolicy | None,
        timeout: float | None,
        depends_on: Iterable[str] | None,
        continue_on_error: bool,
        when: Condition | None = None,
        limit: int | None = None,
    ) -> Entry:
        stage = _check_stage(stage)
        if not isinstance(stage, Pipeline):
            # Stages may carry their own policies (pipekit.ci.CommandStage does);
            # the builder's arguments win over them.
            if retry is None and isinstance(own_retry := getattr(stage, "retry", None), RetryPolicy):
                retry = own_retry
            if timeout is None:
                own_timeout = getattr(stage, "timeout", None)
                if isinstance(own_timeout, int | float) and not isinstance(own_timeout, bool):
                    timeout = own_timeout
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise PipelineDefinitionError(f"stage {stage.name!r}: retry must be a pipekit.RetryPolicy, got {retry!r}")
        if when is not None and not callable(when):
            raise PipelineDefinitionError(f"stage {stage.name!r}: when must be a callable (ctx) -> bool")
        return Entry(
            stage=stage,
            group=group,
            retry=retry,
            timeout=_check_seconds(f"stage {stage.name!r}: timeout", timeout),
            depends_on=_check_depends_on(stage.name, depends_on),
            continue_on_error=bool(continue_on_error),
            when=when,
            limit=limit,
        )

    def add_stage(
        self,
        stage: Stage,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        depends_on: Iterable[str] | None = None,
        continue_on_error: bool = False,
    ) -> Self:
        """Return a new pipeline with ``stage`` added.

        Args:
            stage: The stage (any [`Stage`][pipekit.Stage], a pipeline included).
            retry: Its retry policy; defaults to the stage's own ``retry``
                attribute if it is a `RetryPolicy`, then to the pipeline's
                (`with_retry`).
            timeout: Seconds each attempt may take; defaults to the stage's
                own ``timeout`` attribute if it is a number, then to the
                pipeline's stage timeout.
            depends_on: Names of the stages it waits for; None means the entry
                added just before, ``()`` makes it a root.
            continue_on_error: Record a failure and go on instead of stopping
                the run; its dependents are skipped.

        Raises:
            PipelineDefinitionError: For a duplicate name, a self-dependency, a
                cycle or an invalid option.
        """
        return self.add_conditional_stage(
            stage,
            None,
            retry=retry,
            timeout=timeout,
            depends_on=depends_on,
            continue_on_error=continue_on_error,
        )

    def add_conditional_stage(
        self,
        stage: Stage,
        when: Condition | None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        depends_on: Iterable[str] | None = None,
        continue_on_error: bool = False,
    ) -> Self:
        """Return a new pipeline with ``stage`` added, run only when ``when(ctx)`` is true.

        ``when`` sees the context, earlier outputs included. A false condition
        records the stage as ``SKIPPED``; its dependents still run.

        Args:
            stage: The stage.
            when: ``(ctx) -> bool``; an exception from it fails the stage.
                None runs the stage unconditionally (as `add_stage`).
            retry: As for `add_stage`.
            timeout: As for `add_stage`.
            depends_on: As for `add_stage`.
            continue_on_error: As for `add_stage`.
        """
        return self._with_entries(
            [
                self._entry(
                    stage,
                    self._next_group(),
                    retry=retry,
                    timeout=timeout,
                    depends_on=depends_on,
                    continue_on_error=continue_on_error,
                    when=when,
                )
            ]
        )

    def add_parallel_stages(
        self,
        *stages: Stage,
        limit: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        depends_on: Iterable[str] | None = None,
        continue_on_error: bool = False,
    ) -> Self:
        """Return a new pipeline with a group of stages that run concurrently.

        The group counts as one entry: by default it waits for the entry before
        it, and the next entry waits for all of it.

        Args:
            stages: The stages.
            limit: At most this many of them run at once (None: no limit).
            retry: Policy for each of them.
            timeout: Per-attempt timeout for each of them.
            depends_on: Dependencies of every stage in the group.
            continue_on_error: As for `add_stage`, for each of them.
        """
        if not stages:
            raise PipelineDefinitionError(f"pipeline {self.name!r}: add_parallel_stages needs at least one stage")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise PipelineDefinitionError(
                f"pipeline {self.name!r}: parallel limit must be an integer >= 1, got {limit!r}"
            )
        if depends_on is not None:
            names = {getattr(s, "name", None) for s in stages}
            inside = [d for d in ((depends_on,) if isinstance(depends_on, str) else depends_on) if d in names]
            if inside:
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: a parallel group cannot depend on its own member {inside[0]!r}"
                )
        group = self._next_group()
        return self._with_entries(
            [
                self._entry(
                    s,
                    group,
                    retry=retry,
                    timeout=timeout,
                    depends_on=depends_on,
                    continue_on_error=continue_on_error,
                    limit=limit,
                )
                for s in stages
            ]
        )

    def replace_stage(self, name: str, stage: Stage) -> Self:
        """Return a new pipeline with stage ``name`` swapped for ``stage``.

        The new stage keeps the old one's position, dependencies and policies,
        and must have the same name (tests use this to swap in mocks).

        Raises:
            PipelineDefinitionError: If there is no such stage or the names differ.
        """
        stage = _check_stage(stage)
        if stage.name != name:
            raise PipelineDefinitionError(f"replacement for stage {name!r} is named {stage.name!r}")
        if name not in self.stage_names:
            raise PipelineDefinitionError(f"pipeline {self.name!r} has no stage {name!r}")
        return attrs.evolve(
            self,
            entries=tuple(attrs.evolve(e, stage=stage) if e.name == name else e for e in self.entries),
        )

    def with_retry(self, policy: RetryPolicy | None) -> Self:
        """Return a new pipeline whose stages without a policy of their own use ``policy``."""
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise PipelineDefinitionError(f"with_retry takes a pipekit.RetryPolicy, got {policy!r}")
        return attrs.evolve(self, retry=policy)

    def with_timeout(self, seconds: float | None) -> Self:
        """Return a new pipeline whose whole run may take at most ``seconds``.

        A request's own ``timeout`` also applies; the tighter one wins.
        """
        return attrs.evolve(self, timeout=_check_seconds("pipeline timeout", seconds))

    def with_rollback(self, enabled: bool = True, *, timeout: float | None = None) -> Self:
        """Return a new pipeline with rollback on failure switched on or off.

        Args:
            enabled: Compensate completed stages when the run fails, times out
                or is cancelled (on by default).
            timeout: Seconds the whole compensation may take (60 unless set;
                None keeps the current value).
        """
        checked = _check_seconds("rollback timeout", timeout)
        return attrs.evolve(
            self,
            rollback_enabled=bool(enabled),
            rollback_timeout=self.rollback_timeout if checked is None else checked,
        )

    def with_hooks(self, *hooks: Hook) -> Self:
        """Return a new pipeline that awaits each hook with every event of its runs.

        A hook that raises is logged with its traceback and counted; it never
        breaks the run.
        """
        for h in hooks:
            if not callable(h):
                raise PipelineDefinitionError(f"hooks must be async callables, got {h!r}")
        return attrs.evolve(self, hooks=(*self.hooks, *hooks))

    def with_variables(self, variables: Mapping[str, Any] | None = None, /, **more: Any) -> Self:
        """Return a new pipeline with these variables added (later values win).

        Stages read them as ``ctx.variables``; `pipekit.ci` expands
        ``${NAME}`` in commands from them and the request input. A nested
        pipeline sees the outer pipeline's variables, its own taking
        precedence.

        Raises:
            PipelineDefinitionError: For a name that is not an identifier.
        """
        return attrs.evolve(self, variables={**self.variables, **(variables or {}), **more})

    def with_validators(self, *validators: Validator) -> Self:
        """Return a new pipeline with these pre-flight [`Validator`][pipekit.Validator]s added.

        They all run before any stage (and in dry runs). Their problems are
        aggregated into one [`ValidationError`][pipekit.ValidationError]
        listing each, and nothing executes when any fails.

        Raises:
            PipelineDefinitionError: For an object without an async ``validate(ctx)``.
        """
        return attrs.evolve(self, validators=self.validators + validators)

    # -- the graph --------------------------------------------------------

    def plan(self) -> Plan:
        """Check the whole definition and return the compiled graph (cached).

        Raises:
            PipelineDefinitionError: Naming unknown dependencies or a cycle.
        """
        plan = self._plan
        if plan is None:
            plan = compile_plan(self)
            object.__setattr__(self, "_plan", plan)
        return plan

    def check(self) -> None:
        """Raise [`PipelineDefinitionError`][pipekit.PipelineDefinitionError] if the definition is broken."""
        self.plan()

    # -- running ----------------------------------------------------------

    @property
    def serialised(self) -> bool:
        """Whether runs of this pipeline value wait for each other (atomic pipelines)."""
        return False

    @property
    def keeps_partial_outputs(self) -> bool:
        """Whether a failed run's response keeps the outputs of the stages that succeeded."""
        return True

    @overload
    async def execute(self, ctx: StageContext, /) -> Mapping[str, Any]: ...
    @overload
    async def execute(
        self,
        request: PipelineRequest | None = None,
        /,
        *,
        input: Mapping[str, Any] | None = None,
        hooks: Sequence[Hook] = (),
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
    ) -> PipelineResponse: ...
    async def execute(
        self,
        request: PipelineRequest | StageContext | None = None,
        /,
        *,
        input: Mapping[str, Any] | None = None,  # noqa: A002 - the documented name
        hooks: Sequence[Hook] = (),
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
    ) -> PipelineResponse | Mapping[str, Any]:
        """Run the pipeline and describe what happened.

        Stage failures do not raise: the response's ``status`` and ``error``
        say what happened (``response.raise_for_status()`` raises). Given a
        [`StageContext`][pipekit.StageContext] instead (the pipeline nested as a stage),
        it runs as a stage: it returns its outputs or raises its error.

        Args:
            request: The request; built from ``input`` when omitted.
            input: The request input, when no request is given.
            hooks: Extra async callables awaited with every event of this run.
            tracer_provider: Where the run's spans go (the global provider by default).
            meter_provider: Where the run's metrics go (the global provider by default).
            hook_timeout: Seconds one hook call may take; a hook that overruns
                counts as failed and is not called again during this run.

        Returns:
            The response.

        Raises:
            PipelineDefinitionError: If the definition is broken (unknown
                dependencies, cycles), before anything runs.
        """
        from ._run import execute_pipeline, run_nested  # noqa: PLC0415 - avoids an import cycle

        if isinstance(request, StageContext):
            return await run_nested(self, request)
        request = make_request(self, request, input, "Pipeline.execute()")
        _check_seconds("hook_timeout", hook_timeout)
        return await execute_pipeline(
            self,
            request,
            hooks=tuple(hooks),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            hook_timeout=hook_timeout,
        )

    def validate(self, ctx: StageContext) -> None:
        """Validate every stage of this pipeline (used when it is nested).

        Raises:
            ValidationError: Listing every problem found.
        """
        from ._run import collect_validation_errors  # noqa: PLC0415 - avoids an import cycle

        errors = collect_validation_errors(self, ctx)
        if errors:
            raise ValidationError(
                f"pipeline {self.name!r}: " + "; ".join(str(e) for e in errors),
                stage=self.name,
                errors=errors,
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} stages={list(self.stage_names)!r}>"


@attrs.frozen(eq=False, repr=False)
class AtomicPipeline(Pipeline):
    """All or nothing: any failure rolls back every completed stage.

    Runs of the same atomic pipeline value are serialised (one at a time), and
    the response of a failed run carries no partial outputs. Rollback cannot
    be switched off. No stage may use ``continue_on_error``.
    """

    @property
    def serialised(self) -> bool:
        return True

    @property
    def keeps_partial_outputs(self) -> bool:
        return False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not self.rollback_enabled:
            raise PipelineDefinitionError(f"atomic pipeline {self.name!r} always rolls back; use a Pipeline instead")
        self._refuse_continue_on_error(self.entries)

    def _refuse_continue_on_error(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.continue_on_error:
                raise PipelineDefinitionError(
                    f"atomic pipeline {self.name!r}: stage {e.name!r} cannot use continue_on_error; "
                    "any failure rolls an atomic pipeline back"
                )

    def _with_entries(self, new: Sequence[Entry]) -> Self:
        self._refuse_continue_on_error(new)
        return super()._with_entries(new)

    def with_rollback(self, enabled: bool = True, *, timeout: float | None = None) -> Self:
        """Set the rollback timeout; rollback itself cannot be switched off here.

        Raises:
            PipelineDefinitionError: If ``enabled`` is false.
        """
        if not enabled:
            raise PipelineDefinitionError(f"atomic pipeline {self.name!r} always rolls back; use a Pipeline instead")
        return super().with_rollback(True, timeout=timeout)


@attrs.frozen(eq=False, repr=False)
class WorkflowPipeline(Pipeline):
    """Multi-tool orchestration: pipeline-level policies apply to each stage.

    `with_retry` and `with_timeout` set the default policy and the
    per-attempt timeout of every stage that has none of its own. Partial
    results are kept in the response. Bound the whole run with
    ``RequestOptions(timeout=...)``.
    """

    def with_timeout(self, seconds: float | None) -> Self:
        """Return a new workflow whose stages' attempts may each take at most ``seconds``."""
        return attrs.evolve(self, stage_timeout=_check_seconds("stage timeout", seconds))

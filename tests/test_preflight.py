"""Pre-flight validators: ``Pipeline.with_validators`` and the checks that run before any stage.

Every validator of a pipeline and of the pipelines nested in it runs, in order, before the
first stage of a real run (and in dry runs); the problems of all of them are reported at once
and nothing executes. The cancellation tests run on the fake clock, so a validator that takes
an hour is in flight until something cancels it, and no test really waits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

import pipekit as pk
from pipekit.testing import EventCapture, FakeClock, MockStage, capture_events

HOUR = 3600.0
"""Longer than any test waits: a validator taking this long is in flight until something cancels it."""

DRY_RUN = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
REFUSED = "pre-flight validation failed"


class Seen:
    """What a validator saw of its context."""

    def __init__(self, ctx: pk.StageContext) -> None:
        self.pipeline = ctx.pipeline
        self.stage = ctx.stage
        self.input = dict(ctx.input)
        self.variables = dict(ctx.variables)
        self.outputs = dict(ctx.outputs)
        self.dry_run = ctx.dry_run


class Check:
    """A validator that records its calls in ``journal``, then raises what it is told to.

    Args:
        name: Its name in the journal.
        journal: Where calls are recorded (shared by the stages of a test, to check the order).
        problems: Messages of `pk.ValidationError` s to raise (several: one aggregated error).
        error: Another exception to raise instead.
        delay: Seconds to wait first (on the fake clock).
    """

    def __init__(
        self,
        name: str,
        journal: list[str] | None = None,
        *,
        problems: Sequence[str] = (),
        error: Exception | None = None,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.journal = journal if journal is not None else []
        self.problems = tuple(problems)
        self.error = error
        self.delay = delay
        self.seen: list[Seen] = []
        self.entered = anyio.Event()
        self.interrupted = False

    async def validate(self, ctx: pk.StageContext) -> None:
        """Record the call, wait ``delay``, then raise the planned problems."""
        self.seen.append(Seen(ctx))
        self.journal.append(f"validate {self.name}")
        self.entered.set()
        if self.delay:
            try:
                await anyio.sleep(self.delay)
            except anyio.get_cancelled_exc_class():
                self.interrupted = True
                raise
        if self.error is not None:
            raise self.error
        if len(self.problems) == 1:
            raise pk.ValidationError(self.problems[0])
        if self.problems:
            raise pk.ValidationError("several", errors=[pk.ValidationError(p) for p in self.problems])

    def __repr__(self) -> str:
        return f"<Check {self.name}>"


def journaled(name: str, journal: list[str]) -> pk.FunctionStage:
    """A stage that records ``execute <name>`` in ``journal`` and returns its name."""

    async def run(ctx: pk.StageContext) -> str:
        journal.append(f"execute {name}")
        return name

    return pk.stage(name=name)(run)


def messages(error: BaseException | None) -> list[str]:
    """The individual problems of an aggregated `pk.ValidationError`."""
    assert isinstance(error, pk.ValidationError), error
    return [str(e) for e in error.errors]


def reasons(response: pk.PipelineResponse) -> dict[str, tuple[pk.Status, str | None]]:
    """Each stage's (status, reason)."""
    return {name: (r.status, r.reason) for name, r in response.stages.items()}


class TestWithValidators:
    """``pipeline.with_validators(*validators)`` and the ``pk.Validator`` protocol."""

    def test_returns_a_new_pipeline_with_validators_appended(self) -> None:
        """The original is unchanged; later calls add after the earlier validators."""
        first, second, third = Check("first"), Check("second"), Check("third")
        base = pk.Pipeline("p")
        one = base.with_validators(first)
        three = one.with_validators(second, third)
        assert base.validators == ()
        assert one.validators == (first,)
        assert three.validators == (first, second, third)
        assert three.name == "p"

    def test_keeps_the_pipeline_kind(self) -> None:
        """Atomic and workflow pipelines stay what they are."""
        assert type(pk.AtomicPipeline("a").with_validators(Check("c"))) is pk.AtomicPipeline
        assert type(pk.WorkflowPipeline("w").with_validators(Check("c"))) is pk.WorkflowPipeline

    def test_a_validator_satisfies_the_protocol(self) -> None:
        """Any object with an async ``validate(ctx)`` is a ``pk.Validator``; others are not."""
        assert isinstance(Check("c"), pk.Validator)
        assert not isinstance(object(), pk.Validator)

    @pytest.mark.parametrize("bad", [42, "check", print], ids=["int", "str", "function"])
    def test_rejects_objects_without_validate(self, bad: Any) -> None:
        """An object without ``validate`` is a definition error naming it."""
        with pytest.raises(
            pk.PipelineDefinitionError, match=re.escape("validators need an async validate(ctx) method")
        ):
            pk.Pipeline("p").with_validators(bad)

    def test_rejects_a_class_instead_of_an_instance(self) -> None:
        """Passing the validator class (not an instance) is refused at definition time."""
        with pytest.raises(pk.PipelineDefinitionError, match=re.escape("got <class 'tests.test_preflight.Check'>")):
            pk.Pipeline("p").with_validators(Check)  # type: ignore[arg-type]

    def test_constructor_checks_validators_too(self) -> None:
        """``Pipeline(name, validators=...)`` applies the same check."""
        with pytest.raises(pk.PipelineDefinitionError, match="got 42"):
            pk.Pipeline("p", validators=[42])  # type: ignore[list-item]
        assert pk.Pipeline("p", validators=[c := Check("c")]).validators == (c,)


class TestRealRun:
    """Validators run before any stage of a real run; any problem stops the run before it starts."""

    async def test_validators_run_in_order_before_any_stage(self) -> None:
        """All validators run, in order, before the first stage; then the run proceeds normally."""
        journal: list[str] = []
        pipeline = (
            pk.Pipeline("release")
            .add_stage(journaled("build", journal))
            .add_stage(journaled("deploy", journal))
            .with_validators(Check("config", journal), Check("quota", journal))
        )
        response = await pipeline.execute(input={"env": "prod"})
        assert response.ok
        assert response.outputs == {"build": "build", "deploy": "deploy"}
        assert journal == ["validate config", "validate quota", "execute build", "execute deploy"]

    async def test_a_validator_sees_the_run(self) -> None:
        """A validator's context has the request input, the variables, no outputs yet, and the pipeline's name."""
        check = Check("c")
        pipeline = pk.Pipeline("release").with_variables(REGION="eu").add_stage(MockStage("a")).with_validators(check)
        response = await pipeline.execute(input={"env": "prod"})
        assert response.ok
        [seen] = check.seen
        assert (seen.pipeline, seen.stage, seen.input) == ("release", "release", {"env": "prod"})
        assert (seen.variables, seen.outputs, seen.dry_run) == ({"REGION": "eu"}, {}, False)

    async def test_a_problem_stops_the_run_before_it_starts(self) -> None:
        """One problem: FAILED with a ValidationError, every stage SKIPPED, nothing executed."""
        build, deploy = MockStage("build"), MockStage("deploy")
        check = Check("config", problems=["missing 'REGISTRY'"])
        pipeline = pk.Pipeline("release").add_stage(build).add_stage(deploy).with_validators(check)
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        assert str(response.error) == "pre-flight validation of pipeline 'release' found 1 problem: missing 'REGISTRY'"
        assert messages(response.error) == ["missing 'REGISTRY'"]
        assert reasons(response) == {
            "build": (pk.Status.SKIPPED, REFUSED),
            "deploy": (pk.Status.SKIPPED, REFUSED),
        }
        assert (build.validations, build.calls, deploy.validations, deploy.calls) == ([], [], [], [])
        assert response.outputs == {}

    async def test_every_validator_runs_and_every_problem_is_reported(self) -> None:
        """Validators after a failing one still run; aggregated errors are listed one by one, in order."""
        journal: list[str] = []
        pipeline = (
            pk.Pipeline("release")
            .add_stage(journaled("build", journal))
            .with_validators(
                Check("first", journal, problems=["no 'REGISTRY'", "no 'TOKEN'"]),
                Check("fine", journal),
                Check("last", journal, problems=["disk full"]),
            )
        )
        response = await pipeline.execute()
        assert journal == ["validate first", "validate fine", "validate last"]
        assert messages(response.error) == ["no 'REGISTRY'", "no 'TOKEN'", "disk full"]
        assert str(response.error) == (
            "pre-flight validation of pipeline 'release' found 3 problems: no 'REGISTRY'; no 'TOKEN'; disk full"
        )

    async def test_other_exceptions_are_reported_as_problems(self) -> None:
        """A validator raising something else becomes a ValidationError naming it, with the original as cause."""
        lookup = KeyError("REGION")
        pipeline = pk.Pipeline("release").add_stage(MockStage("a")).with_validators(Check("env", error=lookup))
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        [problem] = response.error.errors
        assert str(problem) == "validator <Check env> raised KeyError: 'REGION'"
        assert problem.__cause__ is lookup

    async def test_only_start_and_finish_events(self) -> None:
        """A refused run emits PipelineStarted and PipelineFinished (FAILED, with the error), nothing in between."""
        events: list[pk.Event] = []

        async def hook(event: pk.Event) -> None:
            events.append(event)

        pipeline = pk.Pipeline("release").add_stage(MockStage("a")).with_validators(Check("c", problems=["no"]))
        with capture_events() as captured:
            response = await pipeline.execute(hooks=[hook])
        assert [type(e) for e in captured] == [pk.PipelineStarted, pk.PipelineFinished]
        assert events == list(captured)
        finished = captured.of(pk.PipelineFinished)[0]
        assert (finished.status, finished.error, finished.parent) == (pk.Status.FAILED, response.error, None)

    async def test_no_rollback_happens(self) -> None:
        """Nothing ran, so nothing is rolled back, even in an atomic pipeline."""
        a = MockStage("a")
        pipeline = pk.AtomicPipeline("release").add_stage(a).with_validators(Check("c", problems=["no"]))
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert (a.calls, a.rollbacks) == ([], [])
        assert not response.stages["a"].rolled_back

    async def test_through_an_engine(self) -> None:
        """An engine execution is refused the same way."""
        a = MockStage("a")
        pipeline = pk.Pipeline("release").add_stage(a).with_validators(Check("c", problems=["no"]))
        async with pk.Engine() as engine:
            response = await engine.execute(pipeline)
        assert response.status is pk.Status.FAILED
        assert messages(response.error) == ["no"]
        assert a.calls == []


class TestNestedPipelines:
    """The validators of nested pipelines run with the outer ones, before the outer run's first stage."""

    async def test_nested_validators_run_after_the_outer_ones_before_any_stage(self) -> None:
        """Outer validators, then each nested pipeline's, in definition order; each once."""
        journal: list[str] = []
        inner = pk.Pipeline("inner").add_stage(journaled("x", journal)).with_validators(Check("inner", journal))
        deepest = pk.Pipeline("deepest").add_stage(journaled("z", journal)).with_validators(Check("deepest", journal))
        middle = pk.Pipeline("middle").add_stage(deepest).with_validators(Check("middle", journal))
        outer = (
            pk.Pipeline("outer")
            .add_stage(journaled("a", journal))
            .add_parallel_stages(inner, middle)
            .with_validators(Check("outer", journal))
        )
        response = await outer.execute()
        assert response.ok
        assert journal[:4] == ["validate outer", "validate inner", "validate middle", "validate deepest"]
        assert sorted(journal[4:]) == ["execute a", "execute x", "execute z"]

    async def test_a_nested_problem_refuses_the_outer_run(self) -> None:
        """A nested pipeline's problem fails the outer run before anything, outer problems first."""
        x = MockStage("x")
        inner = pk.Pipeline("inner").add_stage(x).with_validators(Check("inner", problems=["inner is wrong"]))
        outer = (
            pk.Pipeline("outer")
            .add_stage(MockStage("a"))
            .add_stage(inner)
            .with_validators(Check("outer", problems=["outer is wrong"]))
        )
        with capture_events() as events:
            response = await outer.execute()
        assert response.status is pk.Status.FAILED
        assert str(response.error).startswith("pre-flight validation of pipeline 'outer' found 2 problems: ")
        assert messages(response.error) == ["outer is wrong", "inner is wrong"]
        assert reasons(response) == {"a": (pk.Status.SKIPPED, REFUSED), "inner": (pk.Status.SKIPPED, REFUSED)}
        assert x.calls == []
        assert [e.pipeline for e in events] == ["outer", "outer"]  # the nested pipeline never started

    async def test_a_nested_validator_sees_its_own_pipeline(self) -> None:
        """A nested pipeline's validator sees that pipeline's name and variables over the outer ones."""
        inner_check, outer_check = Check("inner"), Check("outer")
        inner = (
            pk.Pipeline("inner")
            .add_stage(MockStage("x"))
            .with_variables(REGION="us", TIER="gold")
            .with_validators(inner_check)
        )
        outer = pk.Pipeline("outer").with_variables(REGION="eu", ENV="prod").add_stage(inner)
        response = await outer.with_validators(outer_check).execute()
        assert response.ok
        [inner_seen], [outer_seen] = inner_check.seen, outer_check.seen
        assert (outer_seen.pipeline, outer_seen.variables) == ("outer", {"REGION": "eu", "ENV": "prod"})
        assert (inner_seen.pipeline, inner_seen.variables) == ("inner", {"REGION": "us", "TIER": "gold", "ENV": "prod"})

    async def test_a_pipeline_nested_twice_is_validated_once(self) -> None:
        """A pipeline value nested in two places has its validators run once per run."""
        shared_check = Check("shared")
        shared = pk.Pipeline("shared").add_stage(MockStage("x")).with_validators(shared_check)
        outer = (
            pk.Pipeline("outer")
            .add_stage(pk.Pipeline("left").add_stage(shared))
            .add_stage(pk.Pipeline("right").add_stage(shared))
        )
        response = await outer.execute()
        assert response.ok
        assert len(shared_check.seen) == 1

    async def test_a_nested_pipeline_run_alone_runs_its_validators(self) -> None:
        """The nested pipeline, executed on its own, is the top level: its validators run then."""
        check = Check("inner", problems=["no"])
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).with_validators(check)
        response = await inner.execute()
        assert messages(response.error) == ["no"]
        assert len(check.seen) == 1


class TestDryRun:
    """In a dry run, validator problems are reported with the stages' problems."""

    async def test_validators_run_with_dry_run_set(self) -> None:
        """Validators run in a dry run (``ctx.dry_run`` is true); a clean one leaves every stage 'dry run'."""
        check = Check("c")
        a = MockStage("a")
        response = await pk.Pipeline("p").add_stage(a).with_validators(check).execute(DRY_RUN)
        assert response.ok
        assert [s.dry_run for s in check.seen] == [True]
        assert reasons(response) == {"a": (pk.Status.SKIPPED, "dry run")}
        assert a.calls == []

    async def test_problems_come_after_definition_errors_and_before_stage_problems(self) -> None:
        """The dry run's problems: the broken definition, then validators' problems, then the stages'."""
        a = MockStage("a", validate_error="a has no credentials")
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).with_validators(Check("inner", problems=["inner no"]))
        pipeline = (
            pk.Pipeline("p")
            .add_stage(a, depends_on=("missing",))
            .add_stage(inner)
            .with_validators(Check("outer", problems=["outer one", "outer two"]))
        )
        response = await pipeline.execute(DRY_RUN)
        assert response.status is pk.Status.FAILED
        assert messages(response.error) == [
            "pipeline 'p': stage 'a' depends on unknown stage 'missing'",
            "outer one",
            "outer two",
            "inner no",
            "stage 'a': a has no credentials",
        ]
        assert str(response.error).startswith("dry run of pipeline 'p' found 5 problems: ")
        assert response.stages["a"].status is pk.Status.FAILED
        assert reasons(response)["inner"] == (pk.Status.SKIPPED, "dry run")

    async def test_nested_validators_run_once_in_a_dry_run(self) -> None:
        """Validating a nested pipeline's stages does not run its validators a second time."""
        check = Check("inner")
        inner = pk.Pipeline("inner").add_stage(MockStage("x")).with_validators(check)
        response = await pk.Pipeline("outer").add_stage(inner).execute(DRY_RUN)
        assert response.ok
        assert [(s.pipeline, s.dry_run) for s in check.seen] == [("inner", True)]


@pytest.mark.pipekit_clock
class TestInterrupted:
    """Validators run inside the run's cancel scope: cancellation and the run's timeout reach them."""

    async def test_run_timeout_during_a_slow_validator(self, pipekit_clock: FakeClock) -> None:
        """The run's deadline interrupts a validator: TIMED_OUT, no stage ran, later validators never called."""
        slow, later = Check("slow", delay=HOUR), Check("later")
        a = MockStage("a")
        pipeline = pk.Pipeline("release").add_stage(a).with_validators(slow, later).with_timeout(5)
        response = await pipeline.execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.PipelineTimeoutError)
        assert reasons(response) == {"a": (pk.Status.SKIPPED, "not started: the run timed out after 5s")}
        assert slow.interrupted
        assert later.seen == []
        assert (a.validations, a.calls) == ([], [])
        assert pipekit_clock.elapsed() == 5.0

    async def test_request_timeout_during_a_slow_validator(self, pipekit_clock: FakeClock) -> None:
        """A request's own timeout reaches a validator too."""
        slow = Check("slow", delay=HOUR)
        pipeline = pk.Pipeline("release").add_stage(MockStage("a")).with_validators(slow)
        response = await pipeline.execute(pk.PipelineRequest(options=pk.RequestOptions(timeout=2)))
        assert response.status is pk.Status.TIMED_OUT
        assert slow.interrupted
        assert pipekit_clock.elapsed() == 2.0

    async def test_engine_cancel_during_a_slow_validator(self, pipekit_clock: FakeClock) -> None:
        """``handle.cancel()`` while a validator runs: CANCELLED, the validator interrupted, no stage ran."""
        slow = Check("slow", delay=HOUR)
        a = MockStage("a")
        pipeline = pk.Pipeline("release").add_stage(a).with_validators(slow)
        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline)
            await slow.entered.wait()
            await anyio.sleep(1)
            response = await handle.cancel()
            kinds = [type(e) async for e in handle.events()]
        assert response.status is pk.Status.CANCELLED
        assert isinstance(response.error, pk.PipelineCancelledError)
        assert reasons(response) == {"a": (pk.Status.SKIPPED, "not started: the run was cancelled")}
        assert slow.interrupted
        assert (a.validations, a.calls) == ([], [])
        assert kinds == [pk.PipelineStarted, pk.StageSkipped, pk.PipelineFinished]
        assert pipekit_clock.elapsed() == 1.0

    async def test_caller_cancellation_during_a_slow_validator(
        self, pipekit_clock: FakeClock, pipekit_events: EventCapture
    ) -> None:
        """Cancelling the caller's scope interrupts the validator; the run finishes CANCELLED and re-raises."""
        slow = Check("slow", delay=HOUR)
        a = MockStage("a")
        pipeline = pk.Pipeline("release").add_stage(a).with_validators(slow)
        returned = False
        with anyio.move_on_after(3) as scope:
            await pipeline.execute()
            returned = True
        assert scope.cancelled_caught
        assert not returned
        assert slow.interrupted
        assert a.calls == []
        [finished] = pipekit_events.of(pk.PipelineFinished)
        assert finished.status is pk.Status.CANCELLED
        assert pipekit_clock.elapsed() == 3.0

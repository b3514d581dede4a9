"""The typed StageContext: keys, values shared between stages, run metadata and conflicts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, assert_type

import anyio
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_status, capture_logs

StageFn = Callable[[pk.StageContext], Awaitable[Any]]

#: Run the test on the fake clock (pipekit.testing), on the backends conftest's ``anyio_backend`` uses.
fake_clock = pytest.mark.pipekit_clock(backends=[("asyncio", {"debug": True}), "trio"])


def named(name: str, fn: StageFn) -> pk.FunctionStage:
    """Make ``fn`` a stage called ``name``."""
    return pk.stage(name=name)(fn)


def writer(name: str, key: pk.Key[Any], value: Any) -> pk.FunctionStage:
    """A stage that writes ``value`` under ``key`` and returns it."""

    async def execute(ctx: pk.StageContext) -> Any:
        ctx[key] = value
        return value

    return named(name, execute)


async def run_one(fn: StageFn, **execute_kwargs: Any) -> pk.PipelineResponse:
    """Run ``fn`` as the only stage (named "s") of a pipeline."""
    return await pk.Pipeline("p").add_stage(named("s", fn)).execute(**execute_kwargs)


def journal(stage: MockStage) -> list[tuple[str, bool]]:
    """The stage's validates and executes as (kind, dry_run), in the order they happened (by `Call.sequence`).

    A mock's ``validations`` and ``calls`` are separate lists, and a validate and an execute can
    happen at the same instant, so only the calls' sequence numbers order them.
    """
    seen = [(c.sequence, ("validate", c.dry_run)) for c in stage.validations]
    seen += [(c.sequence, ("execute", c.dry_run)) for c in stage.calls]
    return [entry for _, entry in sorted(seen)]


class TestKey:
    """pk.Key[T]: a typed, named handle for a context value."""

    def test_name_and_repr(self) -> None:
        """A key keeps its name and shows it in its repr."""
        key = pk.Key[int]("retries")
        assert key.name == "retries"
        assert repr(key) == "Key('retries')"

    def test_keys_with_same_name_are_equal(self) -> None:
        """Two keys with one name are equal and hash alike; other names differ."""
        assert pk.Key[int]("a") == pk.Key[int]("a")
        assert hash(pk.Key[int]("a")) == hash(pk.Key[int]("a"))
        assert pk.Key[int]("a") != pk.Key[int]("b")
        assert pk.Key[int]("a") != "a"

    @pytest.mark.parametrize("name", ["", 3, None])
    def test_bad_name_rejected(self, name: Any) -> None:
        """A key needs a non-empty string name."""
        with pytest.raises(TypeError, match="non-empty string"):
            pk.Key[int](name)

    async def test_value_type_inferred_from_key(self) -> None:
        """ctx[key] and ctx.get(key, default) are typed from the key (checked by mypy)."""
        count = pk.Key[int]("count")
        label = pk.Key[str]("label")
        seen: list[object] = []

        async def execute(ctx: pk.StageContext) -> None:
            ctx[count] = 41
            ctx[label] = "x"
            n = assert_type(ctx[count], int)
            s = assert_type(ctx.get(label, None), str | None)
            m = assert_type(ctx.get(count, 0.5), int | float)
            seen.extend([n + 1, s, m])

        response = await run_one(execute)
        assert response.ok, response.summary()
        assert seen == [42, "x", 41]

    async def test_wrong_value_type_rejected_by_mypy(self) -> None:
        """Writing a str under a Key[int] is a type error (the ignore would be flagged as unused otherwise)."""
        count = pk.Key[int]("count")

        async def execute(ctx: pk.StageContext) -> None:
            ctx[count] = "not an int"  # type: ignore[misc]

        assert (await run_one(execute)).ok

    async def test_two_keys_with_one_name_share_a_value(self) -> None:
        """A value written through one key is read through another key of the same name."""
        seen: list[int] = []

        async def execute(ctx: pk.StageContext) -> None:
            ctx[pk.Key[int]("shared")] = 7
            seen.append(ctx[pk.Key[int]("shared")])

        assert (await run_one(execute)).ok
        assert seen == [7]


class TestItemAccess:
    """ctx[key], ctx.get, `in` and the KeyError for unset keys."""

    async def test_set_then_get(self) -> None:
        """A value set in a stage can be read back in the same stage."""
        key = pk.Key[list[str]]("items")
        seen: list[list[str]] = []

        async def execute(ctx: pk.StageContext) -> None:
            ctx[key] = ["a", "b"]
            seen.append(ctx[key])

        assert (await run_one(execute)).ok
        assert seen == [["a", "b"]]

    async def test_unset_key_raises_key_error_naming_it(self) -> None:
        """Reading an unset key raises KeyError whose message names the key."""
        caught: list[KeyError] = []

        async def execute(ctx: pk.StageContext) -> None:
            try:
                ctx[pk.Key[int]("missing_value")]
            except KeyError as exc:
                caught.append(exc)

        assert (await run_one(execute)).ok
        assert len(caught) == 1
        assert "missing_value" in str(caught[0])

    async def test_unset_key_fails_the_stage(self) -> None:
        """An uncaught KeyError from an unset key fails the stage with that KeyError."""

        async def execute(ctx: pk.StageContext) -> None:
            ctx[pk.Key[str]("token")]

        response = await run_one(execute)
        assert_status(response, pk.Status.FAILED)
        error = response.stages["s"].error
        assert isinstance(error, KeyError)
        assert "token" in str(error)

    async def test_get_returns_default_when_unset(self) -> None:
        """ctx.get returns None, or the given default, for an unset key, and the value once set."""
        key = pk.Key[int]("n")
        seen: list[object] = []

        async def execute(ctx: pk.StageContext) -> None:
            before, before_default = ctx.get(key), ctx.get(key, 5)
            ctx[key] = 0
            after, after_default = ctx.get(key), ctx.get(key, 5)
            seen.extend([before, before_default, after, after_default])

        assert (await run_one(execute)).ok
        assert seen == [None, 5, 0, 0]

    async def test_contains(self) -> None:
        """`key in ctx` is false until the key is set, also for falsy values."""
        key = pk.Key[bool]("flag")
        seen: list[bool] = []

        async def execute(ctx: pk.StageContext) -> None:
            seen.append(key in ctx)
            ctx[key] = False
            seen.append(key in ctx)
            seen.append(pk.Key[bool]("other") in ctx)
            seen.append(42 in ctx)

        assert (await run_one(execute)).ok
        assert seen == [False, True, False, False]

    async def test_string_keys_address_the_same_values(self) -> None:
        """A plain string names the same value as a Key with that name."""
        seen: list[object] = []

        async def execute(ctx: pk.StageContext) -> None:
            ctx["plain"] = 1
            seen.extend([ctx[pk.Key[int]("plain")], "plain" in ctx, ctx.get("nope", "d")])

        assert (await run_one(execute)).ok
        assert seen == [1, True, "d"]

    async def test_bad_key_type_rejected(self) -> None:
        """Only Key and str can index the context."""
        caught: list[BaseException] = []

        async def execute(ctx: pk.StageContext) -> None:
            try:
                ctx[3] = "x"  # type: ignore[call-overload]
            except TypeError as exc:
                caught.append(exc)

        assert (await run_one(execute)).ok
        assert len(caught) == 1


class TestValueFlow:
    """Values written by one stage are visible to the stages after it."""

    async def test_values_flow_between_sequential_stages(self) -> None:
        """Each stage reads what the previous one wrote."""
        total = pk.Key[int]("total")
        seen: list[int] = []

        async def first(ctx: pk.StageContext) -> None:
            ctx[total] = 1

        async def second(ctx: pk.StageContext) -> None:
            ctx[total] = ctx[total] + 10

        async def third(ctx: pk.StageContext) -> None:
            seen.append(ctx[total])

        pipeline = (
            pk.Pipeline("p").add_stage(named("a", first)).add_stage(named("b", second)).add_stage(named("c", third))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert seen == [11]

    async def test_later_dependent_stage_may_overwrite(self) -> None:
        """A stage that depends on the writer may overwrite its key."""
        key = pk.Key[str]("phase")
        seen: list[str] = []

        async def read(ctx: pk.StageContext) -> None:
            seen.append(ctx[key])

        pipeline = (
            pk.Pipeline("p")
            .add_stage(writer("a", key, "first"))
            .add_stage(writer("b", key, "second"))
            .add_stage(named("c", read))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert seen == ["second"]

    async def test_transitive_dependent_may_overwrite(self) -> None:
        """A stage reached through a chain of dependencies may overwrite too."""
        key = pk.Key[int]("v")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(writer("a", key, 1))
            .add_stage(writer("side", pk.Key[int]("other"), 0))
            .add_stage(writer("c", key, 3), depends_on=("side",))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()

    async def test_stage_after_parallel_group_reads_all_values(self) -> None:
        """A stage after a parallel group sees every value the group wrote."""
        seen: list[tuple[int, int]] = []

        async def read(ctx: pk.StageContext) -> None:
            seen.append((ctx[pk.Key[int]("x")], ctx[pk.Key[int]("y")]))

        pipeline = (
            pk.Pipeline("p")
            .add_parallel_stages(writer("wx", pk.Key[int]("x"), 1), writer("wy", pk.Key[int]("y"), 2))
            .add_stage(named("read", read))
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()
        assert seen == [(1, 2)]

    async def test_values_do_not_leak_between_runs(self) -> None:
        """Each run starts with an empty context."""
        key = pk.Key[int]("runs")
        seen: list[bool] = []

        async def execute(ctx: pk.StageContext) -> None:
            seen.append(key in ctx)
            ctx[key] = 1

        pipeline = pk.Pipeline("p").add_stage(named("s", execute))
        assert (await pipeline.execute()).ok
        assert (await pipeline.execute()).ok
        assert seen == [False, False]


class TestInputAndRequest:
    """ctx.request and the read-only ctx.input."""

    async def test_input_and_request_visible(self) -> None:
        """ctx.input is the request's input and ctx.request the request itself."""
        request = pk.PipelineRequest(type="deploy", input={"env": "prod", "n": 2})
        seen: list[object] = []

        async def execute(ctx: pk.StageContext) -> None:
            seen.extend([dict(ctx.input), ctx.request])

        assert (await run_one(execute, input={"x": 1})).ok
        assert seen[0] == {"x": 1}
        assert isinstance(seen[1], pk.PipelineRequest)
        assert seen[1].input == {"x": 1}
        seen.clear()
        pipeline = pk.Pipeline("p").add_stage(named("s", execute))
        assert (await pipeline.execute(request)).ok
        assert seen == [{"env": "prod", "n": 2}, request]

    async def test_input_is_read_only(self) -> None:
        """Assigning to ctx.input raises TypeError and changes nothing."""
        caught: list[BaseException] = []
        seen: list[dict[str, Any]] = []

        async def execute(ctx: pk.StageContext) -> None:
            try:
                ctx.input["env"] = "dev"  # type: ignore[index]
            except TypeError as exc:
                caught.append(exc)
            seen.append(dict(ctx.input))

        assert (await run_one(execute, input={"env": "prod"})).ok
        assert len(caught) == 1
        assert seen == [{"env": "prod"}]

    async def test_input_is_a_copy(self) -> None:
        """Changing the dict passed as input after building the request does not reach the stages."""
        raw = {"env": "prod"}
        request = pk.PipelineRequest(input=raw)
        raw["env"] = "dev"
        seen: list[str] = []

        async def execute(ctx: pk.StageContext) -> None:
            seen.append(ctx.input["env"])

        assert (await pk.Pipeline("p").add_stage(named("s", execute)).execute(request)).ok
        assert seen == ["prod"]


class TestOutputs:
    """ctx.outputs: the read-only outputs of finished stages."""

    async def test_shows_earlier_outputs_only(self) -> None:
        """A stage sees the outputs of the stages before it, not its own or later ones."""
        a, b, c = MockStage("a", output=1), MockStage("b", output=2), MockStage("c", output=3)
        response = await pk.Pipeline("p").add_stage(a).add_stage(b).add_stage(c).execute()
        assert response.ok
        assert [[dict(call.outputs) for call in m.calls] for m in (a, b, c)] == [[{}], [{"a": 1}], [{"a": 1, "b": 2}]]

    async def test_outputs_are_read_only(self) -> None:
        """Assigning to ctx.outputs raises TypeError; the real outputs are unchanged."""
        caught: list[BaseException] = []

        async def tamper(ctx: pk.StageContext) -> None:
            try:
                ctx.outputs["a"] = "forged"  # type: ignore[index]
            except TypeError as exc:
                caught.append(exc)

        pipeline = pk.Pipeline("p").add_stage(writer("a", pk.Key[str]("k"), "real")).add_stage(named("b", tamper))
        response = await pipeline.execute()
        assert len(caught) == 1
        assert response.outputs["a"] == "real"

    async def test_outputs_include_none(self) -> None:
        """A stage that returned None still has an entry in ctx.outputs."""
        read = MockStage("b")
        pipeline = pk.Pipeline("p").add_stage(MockStage("a", output=None)).add_stage(read)
        assert (await pipeline.execute()).ok
        assert [dict(call.outputs) for call in read.calls] == [{"a": None}]


class TestRunMetadata:
    """ctx.stage, ctx.pipeline, ctx.attempt and ctx.dry_run."""

    async def test_stage_and_pipeline_names(self) -> None:
        """ctx.stage is the current stage's name and ctx.pipeline the pipeline's."""
        seen: list[tuple[str, str]] = []

        async def execute(ctx: pk.StageContext) -> None:
            seen.append((ctx.stage, ctx.pipeline))

        pipeline = pk.Pipeline("deploy").add_stage(named("build", execute)).add_stage(named("ship", execute))
        assert (await pipeline.execute()).ok
        assert seen == [("build", "deploy"), ("ship", "deploy")]

    async def test_attempt_is_one_without_retries(self) -> None:
        """ctx.attempt is 1 on the first (and only) attempt."""
        stage = MockStage("s")
        assert (await pk.Pipeline("p").add_stage(stage).execute()).ok
        assert [call.attempt for call in stage.calls] == [1]

    @fake_clock
    async def test_attempt_counts_retries(self) -> None:
        """ctx.attempt counts up from 1 across retries."""
        stage = MockStage("s", fail_times=2)
        policy = pk.RetryPolicy(max_attempts=3, jitter=0)
        response = await pk.Pipeline("p").add_stage(stage, retry=policy).execute()
        assert response.ok
        assert [(call.attempt, call.time) for call in stage.calls] == [(1, 0), (2, 1), (3, 3)]

    async def test_dry_run_false_in_normal_run(self) -> None:
        """ctx.dry_run is false in validate and execute of a normal run."""
        probe = MockStage("probe")
        assert (await pk.Pipeline("p").add_stage(probe).execute()).ok
        assert journal(probe) == [("validate", False), ("execute", False)]

    async def test_dry_run_true_in_dry_run(self) -> None:
        """ctx.dry_run is true when validate is called by a dry run."""
        probe = MockStage("probe")
        request = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))
        assert (await pk.Pipeline("p").add_stage(probe).execute(request)).ok
        assert journal(probe) == [("validate", True)]


class TestLog:
    """ctx.log is a structlog logger bound with the run's identity."""

    async def test_log_bound_with_request_pipeline_and_stage(self) -> None:
        """Events logged through ctx.log carry request_id, pipeline and stage."""

        async def execute(ctx: pk.StageContext) -> None:
            ctx.log.info("test.stage.hello", answer=42)

        request = pk.PipelineRequest(id="req-1")
        pipeline = pk.Pipeline("greeter").add_stage(named("hello", execute))
        with capture_logs() as logs:
            response = await pipeline.execute(request)
        assert response.ok
        hello = [entry for entry in logs if entry["event"] == "test.stage.hello"]
        assert len(hello) == 1
        entry = hello[0]
        assert entry["request_id"] == "req-1"
        assert entry["pipeline"] == "greeter"
        assert entry["stage"] == "hello"
        assert entry["answer"] == 42
        assert entry["log_level"] == "info"

    async def test_each_stage_logs_under_its_own_name(self) -> None:
        """Two stages of one run log with their own stage names and the same request id."""

        async def execute(ctx: pk.StageContext) -> None:
            ctx.log.warning("test.stage.mark")

        pipeline = pk.Pipeline("p").add_stage(named("one", execute)).add_stage(named("two", execute))
        with capture_logs() as logs:
            response = await pipeline.execute()
        marks = [entry for entry in logs if entry["event"] == "test.stage.mark"]
        assert [m["stage"] for m in marks] == ["one", "two"]
        assert {m["request_id"] for m in marks} == {response.id}


class TestConflicts:
    """Stages that may run concurrently cannot write the same key."""

    async def test_parallel_group_conflict(self) -> None:
        """Two stages of one parallel group writing one key fail with ContextConflictError."""
        key = pk.Key[int]("result")
        pipeline = pk.Pipeline("p").add_parallel_stages(writer("a", key, 1), writer("b", key, 2))
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        conflicts = [r.error for r in response.stages.values() if isinstance(r.error, pk.ContextConflictError)]
        assert len(conflicts) == 1
        conflict = conflicts[0]
        assert conflict.key == "result"
        assert {conflict.stage, conflict.other} == {"a", "b"}
        assert "'result'" in str(conflict)
        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.__cause__ is conflict

    async def test_refused_write_does_not_overwrite(self) -> None:
        """The second writer's write is refused and the first writer's value stays."""
        key = pk.Key[str]("owner")
        first_wrote = anyio.Event()
        seen: list[str] = []

        async def first(ctx: pk.StageContext) -> None:
            ctx[key] = "a"
            first_wrote.set()

        async def second(ctx: pk.StageContext) -> None:
            await first_wrote.wait()
            try:
                ctx[key] = "b"
            finally:
                seen.append(ctx[key])

        pipeline = pk.Pipeline("p").add_parallel_stages(named("a", first), named("b", second), continue_on_error=True)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert seen == ["a"]
        assert response.stages["a"].status is pk.Status.SUCCEEDED
        assert response.stages["b"].status is pk.Status.FAILED
        error = response.stages["b"].error
        assert isinstance(error, pk.ContextConflictError)
        assert (error.key, error.stage, error.other) == ("owner", "b", "a")

    async def test_independent_dag_branches_conflict(self) -> None:
        """Two branches with no path between them writing one key fail with ContextConflictError."""
        key = pk.Key[str]("artifact")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(writer("root", pk.Key[int]("base"), 0))
            .add_stage(writer("left", key, "l"), depends_on=("root",))
            .add_stage(writer("right", key, "r"), depends_on=("root",))
        )
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        conflicts = [r.error for r in response.stages.values() if isinstance(r.error, pk.ContextConflictError)]
        assert len(conflicts) == 1
        assert {conflicts[0].stage, conflicts[0].other} == {"left", "right"}

    async def test_independent_roots_conflict(self) -> None:
        """Two roots (depends_on=()) writing one key conflict even when they happen to run one after another."""
        key = pk.Key[int]("k")
        pipeline = (
            pk.Pipeline("p").add_stage(writer("x", key, 1), depends_on=()).add_stage(writer("y", key, 2), depends_on=())
        )
        response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        assert isinstance(response.error, pk.StageFailedError)
        assert isinstance(response.error.__cause__, pk.ContextConflictError)

    async def test_nested_pipeline_conflicts_with_concurrent_sibling(self) -> None:
        """An inner stage and a concurrent outer sibling writing one key conflict (detected on merge)."""
        key = pk.Key[int]("k")
        sibling_wrote = anyio.Event()

        async def sibling(ctx: pk.StageContext) -> None:
            ctx[key] = 2
            sibling_wrote.set()

        async def inner_write(ctx: pk.StageContext) -> None:
            await sibling_wrote.wait()
            ctx[key] = 1

        inner = pk.Pipeline("inner").add_stage(named("inner_write", inner_write))
        pipeline = pk.Pipeline("p").add_parallel_stages(inner, named("sibling", sibling))
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert_status(response, pk.Status.FAILED)
        error = response.stages["inner"].error
        assert isinstance(error, pk.ContextConflictError)
        assert {error.stage, error.other} == {"inner", "sibling"}

    async def test_nested_pipeline_rolled_back_after_merge_conflict(self) -> None:
        """Inner stages that completed before their writes were refused on merge are still compensated."""
        key = pk.Key[int]("k")
        sibling_wrote = anyio.Event()
        undone: list[str] = []

        async def undo(ctx: pk.StageContext) -> None:
            undone.append(ctx.stage)

        async def sibling(ctx: pk.StageContext) -> None:
            ctx[key] = 2
            sibling_wrote.set()

        async def inner_write(ctx: pk.StageContext) -> None:
            await sibling_wrote.wait()
            ctx[key] = 1

        inner = pk.Pipeline("inner").add_stage(pk.stage(name="inner_write", rollback=undo)(inner_write))
        outer_sibling = pk.stage(name="sibling", rollback=undo)(sibling)
        pipeline = pk.Pipeline("p").add_parallel_stages(inner, outer_sibling)
        with anyio.fail_after(5):
            response = await pipeline.execute()
        assert isinstance(response.stages["inner"].error, pk.ContextConflictError)
        assert sorted(undone) == ["inner_write", "sibling"]

    async def test_distinct_keys_in_parallel_group_fine(self) -> None:
        """Stages of one group writing different keys succeed."""
        pipeline = pk.Pipeline("p").add_parallel_stages(
            writer("a", pk.Key[int]("a"), 1), writer("b", pk.Key[int]("b"), 2)
        )
        response = await pipeline.execute()
        assert response.ok, response.summary()

    async def test_one_stage_may_write_a_key_twice(self) -> None:
        """A stage rewriting its own key is not a conflict."""
        key = pk.Key[int]("n")
        seen: list[int] = []

        async def execute(ctx: pk.StageContext) -> None:
            ctx[key] = 1
            ctx[key] = 2
            seen.append(ctx[key])

        other = writer("other", pk.Key[int]("m"), 0)
        pipeline = pk.Pipeline("p").add_parallel_stages(named("s", execute), other)
        assert (await pipeline.execute()).ok
        assert seen == [2]

    async def test_conflict_error_is_a_pipekit_error(self) -> None:
        """ContextConflictError belongs to the pipekit error family and names both stages."""
        error = pk.ContextConflictError("k", stage="b", other="a")
        assert isinstance(error, pk.PipekitError)
        assert (error.key, error.stage, error.other) == ("k", "b", "a")
        assert "'a'" in str(error)
        assert "'b'" in str(error)

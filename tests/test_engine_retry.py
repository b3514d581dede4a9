"""``Engine(store=...)`` records every execution into a run history, and ``engine.retry`` runs a recorded one again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import pytest

import pipekit as pk
from pipekit.testing import MockStage, assert_status


@attrs.frozen(kw_only=True)
class FakeStage:
    """One recorded stage, as `pk.RecordedStage` describes it."""

    stage: str
    status: Any
    rollback_status: str | None = None
    output: Any = None
    output_restorable: bool = False


@attrs.frozen(kw_only=True)
class FakeRun:
    """One recorded run, as `pk.RecordedRun` describes it (with its metadata, for the tests)."""

    id: str
    pipeline: str
    input: Mapping[str, Any]
    input_restorable: bool = True
    stages: tuple[FakeStage, ...] = ()
    metadata: Mapping[str, str] = attrs.field(factory=dict)


@attrs.define(eq=False)
class _Recording:
    """A run being recorded: its top-level stages by name, each a dict of FakeStage fields."""

    id: str
    pipeline: str
    input: dict[str, Any]
    input_restorable: bool
    metadata: dict[str, str]
    stages: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def freeze(self) -> FakeRun:
        return FakeRun(
            id=self.id,
            pipeline=self.pipeline,
            input=self.input,
            input_restorable=self.input_restorable,
            stages=tuple(FakeStage(stage=name, **fields) for name, fields in self.stages.items()),
            metadata=self.metadata,
        )


def _restorable(output: Any) -> bool:
    try:
        json.dumps(output)
    except (TypeError, ValueError):
        return False
    return True


class FakeRecorder:
    """The store's recorder, shaped like a real one: a writer task runs while it is open.

    Its value is the hook recording events. Leaving it stops the writer and
    flushes, shielded from cancellation, as a recorder must (the engine cannot
    shield it from outside: the writer's task group must close in this task's
    own cancel scope).
    """

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing: anyio.Event | None = None

    async def __aenter__(self) -> pk.Hook:
        self._closing = anyio.Event()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._closing.wait)  # the writer
        self.store.entered += 1
        self.store.open = True
        return self.store.record

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        assert self._closing is not None
        self._closing.set()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # the final write
                self.store.open = False
                self.store.flushed += 1


class FakeStore:
    """An in-memory `pk.RunStore`: records top-level stages of every run the engine's hook sees."""

    def __init__(self) -> None:
        self.runs: dict[str, _Recording] = {}
        self.run_ids: dict[str, str] = {}  # request id -> run id
        self.events: list[pk.Event] = []
        self.entered = 0
        self.flushed = 0
        self.open = False

    def recorder(self) -> FakeRecorder:
        """The recorder the engine enters for its lifetime."""
        return FakeRecorder(self)

    async def get_run(self, run_id: str) -> FakeRun:
        """The recorded run ``run_id`` (KeyError when unknown)."""
        await anyio.lowlevel.checkpoint()
        return self.runs[run_id].freeze()

    def add(self, run: FakeRun) -> None:
        """Put a run in the history, as if an earlier process had recorded it."""
        recording = _Recording(
            id=run.id,
            pipeline=run.pipeline,
            input=dict(run.input),
            input_restorable=run.input_restorable,
            metadata=dict(run.metadata),
        )
        for stage in run.stages:
            fields = attrs.asdict(stage)
            del fields["stage"]
            recording.stages[stage.stage] = fields
        self.runs[run.id] = recording

    def run_of(self, response: pk.PipelineResponse) -> FakeRun:
        """The recorded run of the execution that returned ``response``."""
        return self.runs[self.run_ids[response.id]].freeze()

    async def record(self, event: pk.Event) -> None:
        """The hook: record one event."""
        assert self.open, f"{event.kind} arrived outside the recorder's block"
        self.events.append(event)
        if isinstance(event, pk.PipelineStarted):
            if event.parent is None:
                run_id = f"run-{len(self.runs) + 1}"
                self.run_ids[event.request_id] = run_id
                self.runs[run_id] = _Recording(
                    id=run_id,
                    pipeline=event.pipeline,
                    input=dict(event.input),
                    input_restorable=_restorable(dict(event.input)),
                    metadata=dict(event.metadata),
                )
            return
        run = self.runs[self.run_ids[event.request_id]]
        if event.stage is None or event.pipeline != run.pipeline:  # nested pipelines' stages: not needed here
            return
        stage = run.stages.setdefault(event.stage, {"status": pk.Status.PENDING})
        if isinstance(event, pk.StageSucceeded):
            stage.update(status=pk.Status.SUCCEEDED, output=event.output, output_restorable=_restorable(event.output))
        elif isinstance(event, pk.StageFailed | pk.StageCancelled):
            stage["status"] = event.status
        elif isinstance(event, pk.StageSkipped):
            stage["status"] = pk.Status.SKIPPED
        elif isinstance(event, pk.StageRolledBack):
            stage["rollback_status"] = "rolled_back"
        elif isinstance(event, pk.StageRollbackFailed):
            stage["rollback_status"] = "rollback_failed"


def calls(*stages: MockStage) -> dict[str, int]:
    """How many times each mock was called."""
    return {stage.name: stage.call_count for stage in stages}


class TestRecording:
    """The engine enters the store's recorder for its lifetime and hands it every event."""

    def test_the_fake_is_a_run_store(self) -> None:
        """The test's fake satisfies the protocol (so the tests below exercise the real contract)."""
        assert isinstance(FakeStore(), pk.RunStore)

    def test_rejects_what_is_not_a_run_store(self) -> None:
        """Engine(store=object()) is a TypeError naming the problem."""
        with pytest.raises(TypeError, match=r"Engine store must be a run store .*got <object object"):
            pk.Engine(store=object())  # type: ignore[arg-type]

    async def test_recorder_is_entered_with_the_engine_and_flushed_on_exit(self) -> None:
        """The recorder is entered on entering the engine, and left (flushed) once every execution ended."""
        store = FakeStore()
        engine = pk.Engine(store=store)
        assert (store.entered, store.flushed) == (0, 0)

        async with engine:
            assert (store.entered, store.flushed, store.open) == (1, 0, True)
            handle = await engine.submit(pk.Pipeline("ci").add_stage(MockStage("build", output="image")))

        assert (store.entered, store.flushed, store.open) == (1, 1, False)
        assert handle.status is pk.Status.SUCCEEDED
        assert store.events[-1].kind == "pipeline_finished"  # the run ended before the flush

    async def test_the_hook_sees_every_execution(self) -> None:
        """Each execution's events all reach the recorder, alongside the engine's other hooks."""
        store = FakeStore()
        seen: list[pk.Event] = []

        async def other(event: pk.Event) -> None:
            seen.append(event)

        pipeline = pk.Pipeline("ci").add_stage(MockStage("build", output="image")).add_stage(MockStage("test"))
        async with pk.Engine(store=store, hooks=[other]) as engine:
            first = await engine.execute(pipeline, input={"commit": "a"})
            second = await engine.execute(pipeline, input={"commit": "b"})

        assert store.events == seen
        for response, commit in ((first, "a"), (second, "b")):
            kinds = [event.kind for event in store.events if event.request_id == response.id]
            assert kinds == [
                "pipeline_started",
                "stage_started",
                "stage_succeeded",
                "stage_started",
                "stage_succeeded",
                "pipeline_finished",
            ]
            run = store.run_of(response)
            assert (run.pipeline, dict(run.input)) == ("ci", {"commit": commit})
            assert [(stage.stage, stage.status) for stage in run.stages] == [
                ("build", pk.Status.SUCCEEDED),
                ("test", pk.Status.SUCCEEDED),
            ]

    async def test_recorder_is_flushed_when_the_body_raises(self) -> None:
        """An exception from the engine's body still leaves the recorder, after the executions ended."""
        store = FakeStore()
        build = MockStage("build", block=True)
        handles: list[pk.ExecutionHandle] = []

        async def serve() -> None:
            async with pk.Engine(store=store) as engine:
                handles.append(await engine.submit(pk.Pipeline("ci").add_stage(build)))
                await build.wait_started()
                raise LookupError("the service failed")

        with pytest.raises(ExceptionGroup) as caught:
            await serve()

        assert caught.group_contains(LookupError, match="the service failed")
        [handle] = handles
        assert (store.entered, store.flushed, store.open) == (1, 1, False)
        assert handle.status is pk.Status.CANCELLED
        assert store.events[-1].kind == "pipeline_finished"

    async def test_recorder_is_left_when_the_owner_is_cancelled(self) -> None:
        """A cancelled owner still leaves the recorder (whose final write shields itself), after the run ended."""
        store = FakeStore()
        build = MockStage("build", block=True)

        with anyio.CancelScope() as owner:
            async with pk.Engine(store=store) as engine:
                handle = await engine.submit(pk.Pipeline("ci").add_stage(build))
                await build.wait_started()
                owner.cancel()
                await anyio.sleep_forever()

        assert owner.cancelled_caught
        assert (store.flushed, store.open) == (1, False)
        assert handle.status is pk.Status.CANCELLED
        assert store.events[-1].kind == "pipeline_finished"

    async def test_without_a_store_nothing_is_recorded(self) -> None:
        """An engine without a store runs as before, and retry() says it needs one."""
        async with pk.Engine() as engine:
            response = await engine.execute(pk.Pipeline("ci").add_stage(MockStage("build")))
            with pytest.raises(RuntimeError, match=r"Engine.retry\(\) needs a run history: Engine\(store=...\)"):
                await engine.retry("run-1")
        assert response.ok


class TestRetry:
    """``engine.retry(run_id, from_failed=..., pipeline=...)``."""

    @staticmethod
    def release_pipeline() -> tuple[pk.Pipeline, MockStage, MockStage, MockStage, MockStage]:
        """Stages build (no rollback) -> push (rolled back on failure) -> deploy (fails once) -> announce."""
        build = MockStage("build", output={"digest": "sha256:feed"}, rollback=False)
        push = MockStage("push", output="shop:1.4.2")
        deploy = MockStage("deploy", output="deployed", fail_times=1)
        announce = MockStage("announce", output="announced")
        pipeline = pk.Pipeline("release").add_stage(build).add_stage(push).add_stage(deploy).add_stage(announce)
        return pipeline, build, push, deploy, announce

    async def test_from_failed_restores_what_succeeded_and_reruns_the_rest(self) -> None:
        """Succeeded, not rolled back stages are restored; rolled back, failed and skipped ones run again."""
        store = FakeStore()
        pipeline, build, push, deploy, announce = self.release_pipeline()
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pipeline, input={"version": "1.4.2"})
            old = store.run_of(failed)
            handle = await engine.retry(old.id, from_failed=True)
            response = await handle.wait()

        assert_status(failed, pk.Status.FAILED)
        assert_status(response, pk.Status.SUCCEEDED)
        assert calls(build, push, deploy, announce) == {"build": 1, "push": 2, "deploy": 2, "announce": 1}
        assert response.stages["build"].attempts == 0
        assert response.stages["build"].reason == "restored from an earlier run"
        assert dict(handle.request.options.restore) == {"build": {"digest": "sha256:feed"}}
        # The re-run stages see the restored output and the same input.
        assert push.calls[-1].outputs == {"build": {"digest": "sha256:feed"}}
        assert [call.input for call in push.calls] == [{"version": "1.4.2"}] * 2

    async def test_the_retry_is_recorded_as_a_retry_of_the_old_run(self) -> None:
        """The new run carries the same input and metadata pipekit.trigger=retry, pipekit.retry_of=<old id>."""
        store = FakeStore()
        pipeline, *_ = self.release_pipeline()
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pipeline, input={"version": "1.4.2"})
            old = store.run_of(failed)
            handle = await engine.retry(old.id, from_failed=True)
            response = await handle.wait()

        new = store.run_of(response)
        assert new.id != old.id
        assert dict(new.input) == dict(old.input) == {"version": "1.4.2"}
        assert dict(new.metadata) == {"pipekit.trigger": "retry", "pipekit.retry_of": old.id}
        assert dict(handle.request.metadata) == {"pipekit.trigger": "retry", "pipekit.retry_of": old.id}
        assert handle.request.id != failed.id
        successes = [e for e in store.events if isinstance(e, pk.StageSucceeded) and e.request_id == response.id]
        assert [(e.stage, e.restored, e.attempt) for e in successes] == [
            ("build", True, 0),
            ("push", False, 1),
            ("deploy", False, 1),
            ("announce", False, 1),
        ]

    async def test_without_from_failed_everything_runs_again(self) -> None:
        """from_failed=False (the default) restores nothing."""
        store = FakeStore()
        pipeline, build, push, deploy, announce = self.release_pipeline()
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pipeline, input={"version": "1.4.2"})
            handle = await engine.retry(store.run_of(failed).id)
            response = await handle.wait()

        assert_status(response, pk.Status.SUCCEEDED)
        assert calls(build, push, deploy, announce) == {"build": 2, "push": 2, "deploy": 2, "announce": 1}
        assert dict(handle.request.options.restore) == {}
        assert response.stages["build"].attempts == 1
        assert dict(store.run_of(response).metadata)["pipekit.trigger"] == "retry"

    async def test_a_stage_whose_output_was_not_recorded_runs_again(self) -> None:
        """A succeeded stage whose output is not restorable (not JSON) is run again."""
        store = FakeStore()
        opaque = MockStage("opaque", output=object(), rollback=False)
        plain = MockStage("plain", output=[1, 2], rollback=False)
        flaky = MockStage("flaky", fail_times=1)
        pipeline = pk.Pipeline("p").add_stage(opaque).add_stage(plain).add_stage(flaky)
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pipeline)
            old = store.run_of(failed)
            response = await (await engine.retry(old.id, from_failed=True)).wait()

        assert [(s.stage, s.output_restorable) for s in old.stages if s.status is pk.Status.SUCCEEDED] == [
            ("opaque", False),
            ("plain", True),
        ]
        assert_status(response, pk.Status.SUCCEEDED)
        assert calls(opaque, plain, flaky) == {"opaque": 2, "plain": 1, "flaky": 2}
        assert response.outputs["plain"] == [1, 2]

    async def test_a_retry_of_a_retry_restores_the_restored(self) -> None:
        """Stages restored in a retry are recorded as succeeded, so a further retry restores them again."""
        store = FakeStore()
        build = MockStage("build", output="image", rollback=False)
        test = MockStage("test", output="ok", rollback=False)
        deploy = MockStage("deploy", fail_times=2)
        pipeline = pk.Pipeline("p").add_stage(build).add_stage(test).add_stage(deploy)
        async with pk.Engine(store=store) as engine:
            first = await engine.execute(pipeline)
            second = await (await engine.retry(store.run_of(first).id, from_failed=True)).wait()
            third = await (await engine.retry(store.run_of(second).id, from_failed=True)).wait()

        assert [r.status for r in (first, second, third)] == [pk.Status.FAILED, pk.Status.FAILED, pk.Status.SUCCEEDED]
        assert calls(build, test, deploy) == {"build": 1, "test": 1, "deploy": 3}
        assert dict(store.run_of(third).metadata)["pipekit.retry_of"] == store.run_of(second).id

    async def test_recorded_statuses_may_be_plain_strings(self) -> None:
        """A store may give statuses as `pk.Status` values (strings); only succeeded, not rolled back ones restore."""
        store = FakeStore()
        store.add(
            FakeRun(
                id="earlier",
                pipeline="p",
                input={"n": 1},
                stages=(
                    FakeStage(stage="a", status="succeeded", output="A", output_restorable=True),
                    FakeStage(
                        stage="b", status="succeeded", rollback_status="rolled_back", output="B", output_restorable=True
                    ),
                    FakeStage(stage="c", status="failed"),
                    FakeStage(stage="d", status="skipped"),
                ),
            )
        )
        stages = [MockStage(name, output=name.lower()) for name in "abcd"]
        pipeline = pk.Pipeline("p").add_stage(stages[0]).add_stage(stages[1]).add_stage(stages[2]).add_stage(stages[3])
        async with pk.Engine(store=store) as engine:
            response = await (await engine.retry("earlier", from_failed=True, pipeline=pipeline)).wait()

        assert_status(response, pk.Status.SUCCEEDED)
        assert calls(*stages) == {"a": 0, "b": 1, "c": 1, "d": 1}
        assert response.outputs == {"a": "A", "b": "b", "c": "c", "d": "d"}
        assert stages[1].calls[0].input == {"n": 1}

    async def test_a_given_pipeline_of_the_same_name_runs(self) -> None:
        """``pipeline=`` runs that pipeline (a fixed version, say) instead of the one the engine ran."""
        store = FakeStore()
        broken = MockStage("deploy", error="bug")
        fixed = MockStage("deploy", output="deployed")
        build = MockStage("build", output="image", rollback=False)
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pk.Pipeline("release").add_stage(build).add_stage(broken))
            pipeline = pk.Pipeline("release").add_stage(build).add_stage(fixed)
            handle = await engine.retry(store.run_of(failed).id, from_failed=True, pipeline=pipeline)
            response = await handle.wait()

        assert handle.pipeline is pipeline
        assert_status(response, pk.Status.SUCCEEDED)
        assert (build.call_count, broken.call_count, fixed.call_count) == (1, 1, 1)

    async def test_a_pipeline_the_engine_has_not_run_must_be_given(self) -> None:
        """Retrying a run of a pipeline this engine never ran, without ``pipeline=``, is a clear PipekitError."""
        store = FakeStore()
        store.add(FakeRun(id="yesterday", pipeline="nightly", input={}))
        async with pk.Engine(store=store) as engine:
            with pytest.raises(pk.PipekitError) as caught:
                await engine.retry("yesterday")
            assert engine.list() == []

        assert str(caught.value) == (
            "this engine has not run a pipeline named 'nightly'; pass it: retry(..., pipeline=...)"
        )

    async def test_a_pipeline_of_another_name_is_refused(self) -> None:
        """``pipeline=`` naming another pipeline than the recorded run's is a PipekitError naming both."""
        store = FakeStore()
        store.add(FakeRun(id="yesterday", pipeline="nightly", input={}))
        other = MockStage("build")
        async with pk.Engine(store=store) as engine:
            with pytest.raises(pk.PipekitError, match=r"^run yesterday is of pipeline 'nightly', not 'weekly'$"):
                await engine.retry("yesterday", pipeline=pk.Pipeline("weekly").add_stage(other))
            assert engine.list() == []
        assert other.calls == []

    async def test_a_run_whose_input_was_not_recorded_is_refused(self) -> None:
        """A run whose input was not JSON-serialisable is not retried with a lossy copy of it."""
        store = FakeStore()
        build = MockStage("build", error="boom")
        async with pk.Engine(store=store) as engine:
            failed = await engine.execute(pk.Pipeline("ci").add_stage(build), input={"when": object()})
            old = store.run_of(failed)
            with pytest.raises(pk.PipekitError) as caught:
                await engine.retry(old.id)
        assert str(caught.value) == (
            f"run {old.id} cannot be retried: its input was not JSON-serialisable, so not recorded"
        )
        assert build.call_count == 1

    async def test_an_unknown_run_is_the_stores_lookup_error(self) -> None:
        """A run id the store does not know raises the store's LookupError."""
        async with pk.Engine(store=FakeStore()) as engine:
            with pytest.raises(LookupError):
                await engine.retry("no-such-run")
            assert engine.list() == []

"""RunRecorder: real pipeline runs recorded into a real SQLite file, then queried."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing

import pipekit as pk
from pipekit.ci import OutputLine
from pipekit.store import (
    PipelineStats,
    RunPage,
    RunRecord,
    RunRecorder,
    SqliteStore,
    StoreError,
    WriteBatch,
)
from pipekit.testing import MockStage

NO_WAIT = pk.ExponentialBackoff(max_attempts=3, initial=0, jitter=0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "pipekit.db") as opened:
        yield opened


async def record(
    store: SqliteStore, pipeline: pk.Pipeline, request: pk.PipelineRequest | None = None, **options: Any
) -> tuple[pk.PipelineResponse, RunRecord]:
    """Run ``pipeline`` under a recorder and return its response and its recorded run."""
    async with RunRecorder(store, **options) as recorder:
        response = await pipeline.execute(request or pk.PipelineRequest(input={"n": 1}), hooks=[recorder])
    assert recorder.last_run_id is not None
    return response, await store.get_run(recorder.last_run_id)


def printer(name: str, lines: Iterable[str]) -> pk.Stage:
    """A stage printing ``lines`` as a command would, returning how many it printed."""

    async def run(ctx: pk.StageContext) -> int:
        count = 0
        for line in lines:
            await ctx.emit(OutputLine, stream="stdout", line=line)
            count += 1
        return count

    return pk.stage(name=name)(run)


class GatedStore:
    """A store whose writes wait until the test opens the gate (a very slow disk); counts them."""

    def __init__(self, inner: SqliteStore, *, failures: int = 0) -> None:
        self.inner = inner
        self.gate = anyio.Event()
        self.saves = 0
        self.failures = failures
        self.failed = anyio.Event()

    async def save(self, batch: WriteBatch) -> None:
        await self.gate.wait()
        self.saves += 1
        if self.saves <= self.failures:
            self.failed.set()
            raise StoreError("database x.db: disk I/O error")
        await self.inner.save(batch)

    async def list_runs(self, **filters: Any) -> RunPage:
        return await self.inner.list_runs(**filters)

    async def get_run(self, run_id: str) -> RunRecord:
        return await self.inner.get_run(run_id)

    async def stats(self, *, pipeline: str | None = None, since: datetime | float | None = None) -> list[PipelineStats]:
        return await self.inner.stats(pipeline=pipeline, since=since)

    async def aclose(self) -> None:
        await self.inner.aclose()


class TestRecordingRuns:
    async def test_successful_run(self, store: SqliteStore) -> None:
        """A run's identity, input, definition, status, timings and stages are recorded."""
        pipeline = pk.Pipeline("build").add_stage(MockStage("compile", output={"digest": "sha256:1"}))
        pipeline = pipeline.add_stage(MockStage("package", output=["a.whl", "b.whl"]))
        request = pk.PipelineRequest(type="release", input={"version": "1.2", "flags": [1, 2]})
        before = time.time()
        response, run = await record(store, pipeline, request, definition="name: build\n", trigger="cli")
        assert response.status is pk.Status.SUCCEEDED
        assert (run.pipeline, run.status, run.trigger, run.request_id, run.request_type) == (
            "build",
            "succeeded",
            "cli",
            request.id,
            "release",
        )
        assert run.id != request.id
        assert len(run.id) == 32
        assert run.input == {"version": "1.2", "flags": [1, 2]}
        assert run.input_restorable
        assert run.definition == "name: build\n"
        assert run.definition_hash == hashlib.sha256(b"name: build\n").hexdigest()
        assert run.duration == pytest.approx(response.duration)
        assert run.finished_at is not None
        assert before <= run.started_at.timestamp() <= run.finished_at.timestamp()
        assert (run.finished, run.error, run.retry_of) == (True, None, None)
        assert [(s.stage, s.status, s.attempts) for s in run.stages] == [
            ("compile", "succeeded", 1),
            ("package", "succeeded", 1),
        ]
        assert run.stage("compile").output == {"digest": "sha256:1"}
        assert run.stage("package").output == ["a.whl", "b.whl"]
        assert run.restorable_outputs() == {"compile": {"digest": "sha256:1"}, "package": ["a.whl", "b.whl"]}

    async def test_failure_with_retries(self, store: SqliteStore) -> None:
        """Attempts, the stage's error and the run's error (with its cause) are recorded."""
        pipeline = pk.Pipeline("deploy").with_rollback(False)
        pipeline = pipeline.add_stage(MockStage("push", fail_times=2, output="ok"), retry=NO_WAIT)
        pipeline = pipeline.add_stage(MockStage("migrate", error="connection refused"), retry=NO_WAIT)
        pipeline = pipeline.add_stage(MockStage("notify"))
        response, run = await record(store, pipeline)
        assert response.status is pk.Status.FAILED
        assert run.status == "failed"
        assert run.error is not None
        assert run.error.startswith("StageFailedError: stage 'migrate' failed after 3 attempts")
        assert "connection refused" in run.error
        push, migrate, notify = run.stages
        assert (push.status, push.attempts, push.retries, push.error) == ("succeeded", 3, 2, None)
        assert (migrate.status, migrate.attempts, migrate.error) == ("failed", 3, "MockStageError: connection refused")
        assert (notify.status, notify.reason) == ("skipped", "not started: stage 'migrate' failed")
        assert run.restorable_outputs() == {"push": "ok"}

    async def test_outputs_that_json_cannot_hold(self, store: SqliteStore) -> None:
        """Non-serialisable outputs are marked not restorable (never a crash); tuples come back as lists."""
        pipeline = pk.Pipeline("odd")
        for name, output in [
            ("obj", object()),
            ("int_keys", {1: "a"}),
            ("nan", float("nan")),
            ("a_set", {1, 2}),
            ("tuple", (1, (2, 3))),
            ("proxy", pk.PipelineRequest(input={"k": 1}).input),
            ("none", None),
        ]:
            pipeline = pipeline.add_stage(MockStage(name, output=output))
        response, run = await record(store, pipeline)
        assert response.status is pk.Status.SUCCEEDED
        restorable = {s.stage: (s.output_restorable, s.output) for s in run.stages}
        assert restorable == {
            "obj": (False, None),
            "int_keys": (False, None),
            "nan": (False, None),
            "a_set": (False, None),
            "tuple": (True, [1, [2, 3]]),
            "proxy": (True, {"k": 1}),
            "none": (True, None),
        }
        assert set(run.restorable_outputs()) == {"tuple", "proxy", "none"}

    async def test_oversized_output_is_not_stored(self, store: SqliteStore) -> None:
        """An output larger than max_output_bytes is marked not restorable."""
        pipeline = pk.Pipeline("big").add_stage(MockStage("blob", output="x" * 100))
        _, run = await record(store, pipeline, max_output_bytes=50)
        assert (run.stage("blob").output_restorable, run.stage("blob").output) == (False, None)

    async def test_input_that_json_cannot_hold(self, store: SqliteStore) -> None:
        """A non-serialisable input is kept as reprs and marked not restorable."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        _, run = await record(store, pipeline, pk.PipelineRequest(input={"path": Path("/x"), "n": 2}))
        assert run.input == {"path": repr(Path("/x")), "n": 2}
        assert not run.input_restorable

    async def test_rollback_status(self, store: SqliteStore) -> None:
        """Compensated stages keep their forward status and say how their rollback went."""
        pipeline = pk.Pipeline("shop").add_stage(MockStage("reserve", output=1))
        pipeline = pipeline.add_stage(MockStage("charge", output=2, rollback_error="refund failed"))
        pipeline = pipeline.add_stage(MockStage("log", rollback=False))
        pipeline = pipeline.add_stage(MockStage("ship", error="no trucks"))
        _, run = await record(store, pipeline)
        states = {s.stage: (s.status, s.rollback_status, s.rollback_error) for s in run.stages}
        assert states == {
            "reserve": ("succeeded", "rolled_back", None),
            "charge": ("succeeded", "rollback_failed", "MockStageError: refund failed"),
            "log": ("succeeded", None, None),
            "ship": ("failed", None, None),
        }
        assert run.restorable_outputs() == {"log": None}

    async def test_nested_pipeline_stages_are_qualified(self, store: SqliteStore) -> None:
        """Stages of nested pipelines are named by their path; the nested pipeline is a stage too."""
        inner = pk.Pipeline("checks").add_stage(MockStage("lint", output=1)).add_stage(MockStage("test", output=2))
        deeper = pk.Pipeline("deep").add_stage(MockStage("leaf", output=3))
        outer = pk.Pipeline("ci").add_stage(MockStage("build", output=0)).add_stage(inner).add_stage(deeper)
        _, run = await record(store, outer)
        assert [(s.stage, s.pipeline) for s in run.stages] == [
            ("build", "ci"),
            ("checks", "ci"),
            ("checks/lint", "checks"),
            ("checks/test", "checks"),
            ("deep", "ci"),
            ("deep/leaf", "deep"),
        ]
        assert run.stage("checks").output == {"lint": 1, "test": 2}
        assert run.restorable_outputs() == {"build": 0, "checks": {"lint": 1, "test": 2}, "deep": {"leaf": 3}}
        assert (await store.list_runs()).total == 1  # nested runs belong to the one execution

    async def test_log_tail(self, store: SqliteStore) -> None:
        """Lines a stage's commands print are kept per stage, bounded to the last lines."""
        pipeline = pk.Pipeline("logs").add_stage(printer("chatty", [f"line {i}" for i in range(10)]))
        pipeline = pipeline.add_stage(printer("quiet", []))
        _, run = await record(store, pipeline, log_lines=3)
        assert run.stage("chatty").log_tail == ("line 7", "line 8", "line 9")
        assert run.stage("chatty").output == 10
        assert run.stage("quiet").log_tail == ()

    async def test_log_tail_is_bounded_in_bytes(self, store: SqliteStore) -> None:
        """The tail also keeps at most log_bytes; an overlong line keeps its end."""
        pipeline = pk.Pipeline("logs").add_stage(printer("wide", ["aaaa", "bbbb", "cccc"]))
        pipeline = pipeline.add_stage(printer("huge", ["x" * 50 + "END"]))
        _, run = await record(store, pipeline, log_bytes=10)
        assert run.stage("wide").log_tail == ("bbbb", "cccc")
        assert run.stage("huge").log_tail == ("x" * 7 + "END",)

    async def test_rerunning_a_request_makes_a_new_run(self, store: SqliteStore) -> None:
        """The same request run twice is two executions with their own ids; run_ids has the latest."""
        pipeline = pk.Pipeline("again").add_stage(MockStage("a", output=1))
        request = pk.PipelineRequest(input={"x": 1})
        async with RunRecorder(store) as recorder:
            await pipeline.execute(request, hooks=[recorder])
            first = recorder.run_ids[request.id]
            await pipeline.execute(request, hooks=[recorder])
            second = recorder.run_ids[request.id]
        page = await store.list_runs()
        assert first != second
        assert {r.id for r in page.runs} == {first, second}
        assert {r.request_id for r in page.runs} == {request.id}
        assert recorder.last_run_id == second

    async def test_retry_link(self, store: SqliteStore) -> None:
        """A recorder for a retry links its runs to the run they retry."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        _, old = await record(store, pipeline)
        _, new = await record(store, pipeline, trigger="retry", retry_of=old.id)
        assert (new.retry_of, new.trigger) == (old.id, "retry")

    async def test_concurrent_runs_in_one_recorder(self, store: SqliteStore) -> None:
        """Interleaved runs through one recorder each get their own run and stages."""

        async def step(ctx: pk.StageContext) -> int:
            await anyio.lowlevel.checkpoint()
            return int(ctx.input["i"]) * 10

        pipeline = pk.Pipeline("par").add_stage(pk.stage(name="first")(step)).add_stage(pk.stage(name="second")(step))
        async with RunRecorder(store, batch_size=3) as recorder, anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(functools.partial(pipeline.execute, input={"i": i}, hooks=[recorder]))
        page = await store.list_runs()
        assert page.total == 6
        for summary in page.runs:
            run = await store.get_run(summary.id)
            i = run.input["i"]
            assert [(s.stage, s.output) for s in run.stages] == [("first", i * 10), ("second", i * 10)]
        assert recorder.statistics().runs == 6

    async def test_engine_hook(self, store: SqliteStore) -> None:
        """A recorder given to an Engine records every execution it runs."""
        pipeline = pk.Pipeline("svc").add_stage(MockStage("a", output="x"))
        async with RunRecorder(store) as recorder, pk.Engine(hooks=[recorder]) as engine:
            for _ in range(3):
                await engine.execute(pipeline, input={})
        stats = await store.stats(pipeline="svc")
        assert (stats[0].runs, stats[0].success_rate) == (3, 1.0)

    async def test_flakiest_stages_from_real_runs(self, store: SqliteStore) -> None:
        """stats() over recorded runs ranks the stages by their retries."""
        async with RunRecorder(store) as recorder:
            for _ in range(2):
                pipeline = pk.Pipeline("flaky").add_stage(MockStage("pull", fail_times=2), retry=NO_WAIT)
                pipeline = pipeline.add_stage(MockStage("test", fail_times=1), retry=NO_WAIT)
                await pipeline.execute(hooks=[recorder])
        [stats] = await store.stats()
        assert stats.flakiest == (("pull", 4), ("test", 2))
        assert stats.success_rate == 1.0

    async def test_events_of_runs_started_elsewhere_are_ignored(self, store: SqliteStore) -> None:
        """Events of a run whose start the recorder did not see are ignored, not a crash."""
        async with RunRecorder(store) as recorder:
            await recorder(pk.StageStarted(request_id="r", pipeline="p", timestamp=time.time(), stage="s"))
            await recorder(pk.PipelineFinished(request_id="r", pipeline="p", timestamp=time.time()))
        assert (await store.list_runs()).total == 0
        assert recorder.statistics().events == 2


class TestWriting:
    async def test_a_slow_store_does_not_slow_the_run(self, store: SqliteStore) -> None:
        """The run finishes while the store cannot write; everything is written once it can."""
        gated = GatedStore(store)
        pipeline = pk.Pipeline("fast")
        for i in range(10):
            pipeline = pipeline.add_stage(MockStage(f"s{i}", output=i))
        async with RunRecorder(gated) as recorder:
            response = await pipeline.execute(hooks=[recorder])
            assert response.status is pk.Status.SUCCEEDED
            assert gated.saves == 0
            assert recorder.statistics().pending == 11  # the run and its ten stages, coalesced
            gated.gate.set()
            await recorder.flush()
            assert recorder.statistics().pending == 0
            run = await store.get_run(recorder.run_ids[response.id])
        assert [s.output for s in run.stages] == list(range(10))

    async def test_batches(self, store: SqliteStore) -> None:
        """Events are written in batches, and a finished run right away."""
        pipeline = pk.Pipeline("batched")
        for i in range(20):
            pipeline = pipeline.add_stage(MockStage(f"s{i}"))
        async with RunRecorder(store, batch_size=10_000, flush_interval=3_600) as recorder:
            response = await pipeline.execute(hooks=[recorder])
            await recorder.flush()
            statistics = recorder.statistics()
        assert statistics.events == 2 + 2 * 20
        assert statistics.batches == 1
        assert statistics.rows == 21
        assert (await store.get_run(recorder.run_ids[response.id])).status == "succeeded"

    async def test_backpressure_when_far_behind(self, store: SqliteStore) -> None:
        """Beyond max_pending rows the hook waits for the writer; no event is dropped."""
        gated = GatedStore(store)
        pipeline = pk.Pipeline("slow")
        for i in range(6):
            pipeline = pipeline.add_stage(MockStage(f"s{i}"))
        responses: list[pk.PipelineResponse] = []

        async def run(recorder: RunRecorder) -> None:
            responses.append(await pipeline.execute(hooks=[recorder]))

        async with RunRecorder(gated, max_pending=3) as recorder, anyio.create_task_group() as tg:
            tg.start_soon(run, recorder)
            await anyio.wait_all_tasks_blocked()
            assert responses == []  # held back by the store
            gated.gate.set()
        assert responses[0].status is pk.Status.SUCCEEDED
        run_record = await store.get_run(recorder.run_ids[responses[0].id])
        assert [s.status for s in run_record.stages] == ["succeeded"] * 6
        assert run_record.status == "succeeded"

    async def test_failed_write_is_retried(self, store: SqliteStore) -> None:
        """A batch that fails is logged and written again later; nothing is lost."""
        gated = GatedStore(store, failures=1)
        gated.gate.set()
        pipeline = pk.Pipeline("retried").add_stage(MockStage("a", output=1))
        with structlog.testing.capture_logs() as logs:
            async with RunRecorder(gated, flush_interval=3_600) as recorder:
                await pipeline.execute(hooks=[recorder])
                await gated.failed.wait()
                await recorder.flush()
                assert recorder.error is None
        assert recorder.statistics().failures == 1
        assert any(e["event"] == "pipekit.store.write_failed" for e in logs)
        assert (await store.get_run(recorder.last_run_id or "")).stage("a").output == 1

    async def test_final_write_failure_is_raised_on_exit(self, store: SqliteStore) -> None:
        """If the last write fails, leaving the block raises the store's one-line error."""
        gated = GatedStore(store, failures=1_000)
        gated.gate.set()
        pipeline = pk.Pipeline("lost").add_stage(MockStage("a"))
        with structlog.testing.capture_logs(), pytest.raises(StoreError, match=r"^database x\.db: disk I/O error$"):
            async with RunRecorder(gated, flush_interval=3_600) as recorder:
                await pipeline.execute(hooks=[recorder])
        assert recorder.statistics().pending == 2

    async def test_final_write_failure_does_not_mask_the_blocks_error(self, store: SqliteStore) -> None:
        """With an error in the block, that error propagates, noting the history was not written."""
        gated = GatedStore(store, failures=1_000)
        gated.gate.set()
        pipeline = pk.Pipeline("lost").add_stage(MockStage("a"))

        async def scenario() -> None:
            async with RunRecorder(gated, flush_interval=3_600) as recorder:
                await pipeline.execute(hooks=[recorder])
                raise KeyError("boom")

        with structlog.testing.capture_logs(), pytest.raises(KeyError) as caught:
            await scenario()
        assert caught.value.__notes__ == ["the run history was not fully written: database x.db: disk I/O error"]

    async def test_flush_reports_a_failed_write(self, store: SqliteStore) -> None:
        """flush() raises the store's error when the write it waits for fails."""
        gated = GatedStore(store, failures=1)  # closed: the first write waits for the gate

        async def open_gate() -> None:
            await anyio.wait_all_tasks_blocked()
            gated.gate.set()

        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        with structlog.testing.capture_logs():
            async with RunRecorder(gated, flush_interval=3_600, batch_size=10_000) as recorder:
                await pipeline.execute(hooks=[recorder])
                async with anyio.create_task_group() as tg:
                    tg.start_soon(open_gate)
                    with pytest.raises(StoreError, match="disk I/O error"):
                        await recorder.flush()
        assert gated.saves == 2
        assert (await store.list_runs()).total == 1  # written again on exit


class TestClosing:
    async def test_cancelled_run_is_flushed_on_exit(self, store: SqliteStore) -> None:
        """Cancelling the block mid-run still records the run as cancelled, with its rollback."""
        held = MockStage("deploy", block=True)
        pipeline = pk.Pipeline("cancel").add_stage(MockStage("build", output=1)).add_stage(held)
        with anyio.CancelScope() as scope:
            async with RunRecorder(store, flush_interval=3_600) as recorder, anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(pipeline.execute, hooks=[recorder]))
                await held.wait_started()
                scope.cancel()
        assert scope.cancelled_caught
        run = await store.get_run(recorder.last_run_id or "")
        assert run.status == "cancelled"
        assert run.error == "PipelineCancelledError: pipeline 'cancel' was cancelled"
        assert [(s.stage, s.status, s.rollback_status) for s in run.stages] == [
            ("build", "succeeded", "rolled_back"),
            ("deploy", "cancelled", None),
        ]

    async def test_runs_unfinished_at_exit_are_interrupted(self, store: SqliteStore) -> None:
        """A run still going when the recorder closes is recorded interrupted; later events are refused."""
        held = MockStage("deploy", block=True)
        pipeline = pk.Pipeline("outlived").add_stage(held)
        with structlog.testing.capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                async with RunRecorder(store) as recorder:
                    tg.start_soon(functools.partial(pipeline.execute, hooks=[recorder]))
                    await held.wait_started()
                held.release()
        run = await store.get_run(recorder.last_run_id or "")
        assert (run.status, run.error) == ("interrupted", "the run history recorder was closed before the run finished")
        assert (run.stage("deploy").status, run.stage("deploy").reason) == (
            "interrupted",
            "interrupted: the recorder was closed",
        )
        assert any(e["event"] == "pipekit.hook.failed" for e in logs)  # the run's later events were refused

    async def test_hook_outside_the_block(self, store: SqliteStore) -> None:
        """Calling the hook before entering or after leaving raises naming the problem."""
        recorder = RunRecorder(store)
        event = pk.PipelineStarted(request_id="r", pipeline="p", timestamp=time.time())
        with pytest.raises(RuntimeError, match="RunRecorder is new: it records only inside its `async with` block"):
            await recorder(event)
        async with recorder:
            pass
        with pytest.raises(RuntimeError, match="RunRecorder is closed"):
            await recorder(event)
        with pytest.raises(RuntimeError, match="entered only once"):
            async with recorder:
                pass

    def test_bad_options(self, tmp_path: Path) -> None:
        """Nonsense options are refused when the recorder is made."""
        store = SqliteStore(tmp_path / "x.db")
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            RunRecorder(store, batch_size=0)
        with pytest.raises(ValueError, match="flush_interval must be a number of seconds >= 0"):
            RunRecorder(store, flush_interval=-1)
        with pytest.raises(TypeError, match="definition must be the definition's text"):
            RunRecorder(store, definition=b"x")  # type: ignore[arg-type]

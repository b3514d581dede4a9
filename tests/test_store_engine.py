"""`SqliteStore` as an `Engine`'s run history: recorder(), metadata, dry runs, retry right after a run."""

from __future__ import annotations

from pathlib import Path

import pipekit as pk
from pipekit.store import RunRecorder, SqliteStore
from pipekit.testing import MockStage


def _pipeline(first: MockStage, flaky: MockStage) -> pk.Pipeline:
    return pk.Pipeline("release").add_stage(first).add_stage(flaky).with_rollback(False)


class TestEngineStore:
    async def test_sqlite_store_is_a_run_store(self, tmp_path: Path) -> None:
        """SqliteStore satisfies the core protocol the Engine checks, and recorder() gives a RunRecorder."""
        async with SqliteStore(tmp_path / "db") as store:
            assert isinstance(store, pk.RunStore)
            assert isinstance(store.recorder(trigger="cli"), RunRecorder)

    async def test_retry_right_after_a_failed_run_restores_what_succeeded(self, tmp_path: Path) -> None:
        """engine.retry() reads the run just recorded (pending writes are flushed first) and links the new one."""
        first, flaky = MockStage("build", output={"artifact": "a.whl"}), MockStage("deploy", fail_times=1)
        pipeline = _pipeline(first, flaky)
        async with SqliteStore(tmp_path / "db") as store:
            async with pk.Engine(store=store) as engine:
                response = await engine.execute(pipeline, input={"version": "1.2"})
                assert response.status is pk.Status.FAILED
                (failed,) = (await store.list_runs()).runs
                retried = await (await engine.retry(failed.id, from_failed=True)).wait()
            assert retried.status is pk.Status.SUCCEEDED
            assert len(first.calls) == 1  # restored, not run again
            assert len(flaky.calls) == 2
            assert retried.outputs["build"] == {"artifact": "a.whl"}
            runs = (await store.list_runs()).runs
            latest = await store.get_run(runs[0].id)
            assert (latest.trigger, latest.retry_of, latest.status) == ("retry", failed.id, "succeeded")
            assert dict(latest.input) == {"version": "1.2"}

    async def test_request_metadata_overrides_the_recorder_defaults(self, tmp_path: Path) -> None:
        """pipekit.trigger / pipekit.definition in request metadata are recorded, with the definition's hash."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        request = pk.PipelineRequest(metadata={"pipekit.trigger": "cli", "pipekit.definition": "name: p\n"})
        async with SqliteStore(tmp_path / "db") as store:
            async with pk.Engine(store=store) as engine:
                await engine.execute(pipeline, request)
            (run,) = (await store.list_runs()).runs
            record = await store.get_run(run.id)
        assert record.trigger == "cli"
        assert record.definition == "name: p\n"
        assert record.definition_hash is not None
        assert len(record.definition_hash) == 64

    async def test_dry_runs_are_not_recorded(self, tmp_path: Path) -> None:
        """A dry run executes nothing, so the history gets no run for it."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        async with SqliteStore(tmp_path / "db") as store:
            async with pk.Engine(store=store) as engine:
                await engine.execute(pipeline, pk.PipelineRequest(options=pk.RequestOptions(dry_run=True)))
                await engine.execute(pipeline)
            assert (await store.list_runs()).total == 1


class TestCommandResults:
    async def test_command_results_are_stored_and_restored_as_themselves(self, tmp_path: Path) -> None:
        """A CommandStage's output (a CommandResult, alone or in a list) round-trips through the history."""
        import sys

        from pipekit.ci import CommandResult, CommandStage

        command = CommandStage("hello", [sys.executable, "-c", "print('hi')"])

        @pk.stage
        async def both(ctx: pk.StageContext) -> list[CommandResult]:
            return [ctx.outputs["hello"], ctx.outputs["hello"]]

        pipeline = pk.Pipeline("p").add_stage(command).add_stage(both)
        async with SqliteStore(tmp_path / "db") as store:
            async with pk.Engine(store=store) as engine:
                response = await engine.execute(pipeline)
            (run,) = (await store.list_runs()).runs
            record = await store.get_run(run.id)
        stages = {s.stage: s for s in record.stages}
        assert stages["hello"].output_restorable
        assert stages["hello"].output == response.outputs["hello"]
        assert isinstance(stages["hello"].output, CommandResult)
        assert stages["hello"].output.stdout == "hi\n"
        assert stages["both"].output == [response.outputs["hello"]] * 2


class TestRetryCarriesOver:
    async def test_definition_options_and_metadata(self, tmp_path: Path) -> None:
        """retry() keeps the recorded definition (a retry can be retried), and takes options and metadata."""
        seen: list[pk.PipelineStarted] = []

        async def watch(event: pk.Event) -> None:
            if isinstance(event, pk.PipelineStarted):
                seen.append(event)

        flaky = MockStage("deploy", fail_times=1)
        pipeline = _pipeline(MockStage("build"), flaky)
        request = pk.PipelineRequest(type="deploy", metadata={"pipekit.definition": "name: release\n"})
        async with SqliteStore(tmp_path / "db") as store:
            async with pk.Engine(store=store, hooks=[watch]) as engine:
                await engine.execute(pipeline, request)
                (failed,) = (await store.list_runs()).runs
                handle = await engine.retry(
                    failed.id,
                    from_failed=True,
                    options=pk.RequestOptions(max_parallel=1),
                    metadata={"team": "web"},
                )
                await handle.wait()
            latest = await store.get_run((await store.list_runs()).runs[0].id)
        assert latest.definition == "name: release\n"
        assert handle.request.options.max_parallel == 1
        assert handle.request.type == "deploy"
        assert set(handle.request.options.restore) == {"build"}
        assert seen[-1].metadata["team"] == "web"
        assert seen[-1].metadata["pipekit.retry_of"] == failed.id


class TestValidationMessage:
    async def test_the_stage_is_named_once(self) -> None:
        """A stage failing validation in a real run is named once in the run's error."""

        class Picky(pk.BaseStage):
            name = "picky"

            def validate(self, ctx: pk.StageContext) -> None:
                raise pk.ValidationError("stage 'picky': needs input 'x'", stage="picky")

            async def execute(self, ctx: pk.StageContext) -> None:
                raise AssertionError("not reached")

        response = await pk.Pipeline("p").add_stage(Picky()).execute()
        assert str(response.error) == "stage 'picky' failed validation: needs input 'x'"

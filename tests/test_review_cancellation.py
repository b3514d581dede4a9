"""Cancellation, timeouts and clean-up of the run history, the process handling, the engine and the CLI.

Each test pins down one way clean-up could go wrong: a task group left open,
a shield without a bound, a wait that never ends, an error masking another,
a cancellation swallowed, a process left running.
"""

from __future__ import annotations

import shlex
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import structlog.testing

import pipekit as pk
from pipekit.ci import CommandStage, OutputLine
from pipekit.ci._command import _LogFile
from pipekit.store import RunRecorder, SqliteStore, StoreError, WriteBatch
from pipekit.testing import FakeClock, MockStage, capture_events
from tests.helpers import new_marker, signal_cli, survivors

PY = sys.executable
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A real run history in the test's directory."""
    async with SqliteStore(tmp_path / "pipekit.db") as opened:
        yield opened


def started(request_id: str = "r") -> pk.PipelineStarted:
    """The event that begins a recorded run."""
    return pk.PipelineStarted(request_id=request_id, pipeline="p", timestamp=time.time())


def line(n: int, request_id: str = "r") -> OutputLine:
    """A line of command output of stage ``s``."""
    return OutputLine(
        request_id=request_id, pipeline="p", timestamp=time.time(), stage="s", stream="stdout", line=str(n)
    )


class SlowStore:
    """A real SQLite store whose every write first takes ``delay`` seconds (a slow disk)."""

    def __init__(self, inner: SqliteStore, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.calls = 0

    async def save(self, batch: WriteBatch) -> None:
        self.calls += 1
        await anyio.sleep(self.delay)
        await self.inner.save(batch)


class FailingStore(SqliteStore):
    """A real SQLite store whose writes all fail (a full disk)."""

    async def save(self, batch: WriteBatch) -> None:
        raise StoreError(f"database {self.path}: database or disk is full", path=self.path)


# -- the run recorder -------------------------------------------------------------------


class TestRecorderLifecycle:
    async def test_entering_in_a_cancelled_scope_leaves_no_task_group_open(self, store: SqliteStore) -> None:
        """A recorder entered under a cancelled scope closes its task group again: the scope catches the cancel."""
        entered = False
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with RunRecorder(store):
                entered = True
        assert scope.cancelled_caught
        assert not entered

    async def test_an_error_in_the_block_survives_a_cancellation_on_exit(self, store: SqliteStore) -> None:
        """The block's error propagates even when an enclosing scope is cancelled as it leaves."""

        async def scenario() -> None:
            with anyio.CancelScope() as scope:
                async with RunRecorder(store):
                    scope.cancel()
                    raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            await scenario()

    @pytest.mark.pipekit_clock
    @pytest.mark.parametrize(("flush_interval", "writing"), [(0, 1), (3_600, 0)], ids=["in-progress", "last"])
    async def test_a_hung_write_is_cut_short_by_close_timeout(
        self, store: SqliteStore, pipekit_clock: FakeClock, flush_interval: float, writing: int
    ) -> None:
        """A write the store never finishes (begun before leaving, or on leaving) ends at ``close_timeout``."""
        hung = SlowStore(store, delay=3_600)
        recorder = RunRecorder(hung, flush_interval=flush_interval, close_timeout=5)
        left = 0.0

        async def scenario() -> None:
            nonlocal left
            async with recorder:
                await recorder(started())
                while hung.calls < writing:
                    await anyio.lowlevel.checkpoint()
                await anyio.wait_all_tasks_blocked()
                assert hung.calls == writing  # the writer is in its (shielded) write, or waits to batch
                left = pipekit_clock.now()

        with structlog.testing.capture_logs(), pytest.raises(StoreError, match=r"did not finish within 5s; 1 rows"):
            await scenario()
        assert pipekit_clock.now() - left == pytest.approx(5)
        assert recorder.statistics().pending == 1

    @pytest.mark.pipekit_clock
    async def test_backpressure_on_a_hung_store_is_bounded(self, store: SqliteStore, pipekit_clock: FakeClock) -> None:
        """A hook held back by a store that never writes costs the run one ``hook_timeout``; leaving is bounded."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a")).add_stage(MockStage("b"))
        responses: list[pk.PipelineResponse] = []
        ran = 0.0

        async def scenario() -> None:
            nonlocal ran
            async with RunRecorder(SlowStore(store, delay=3_600), max_pending=1, close_timeout=5) as recorder:
                responses.append(await pipeline.execute(hooks=[recorder], hook_timeout=2))
                ran = pipekit_clock.elapsed()

        with structlog.testing.capture_logs() as logs, pytest.raises(StoreError, match="did not finish within 5s"):
            await scenario()
        (response,) = responses
        assert response.status is pk.Status.SUCCEEDED
        assert response.hook_failures == 1  # held back once, then not called again in this run
        assert ran == pytest.approx(2)
        assert pipekit_clock.elapsed() == pytest.approx(2 + 5)
        assert any(e["event"] == "pipekit.hook.failed" for e in logs)


class TestRecorderFlush:
    async def test_flush_returns_while_events_keep_coming(self, store: SqliteStore) -> None:
        """flush() waits for what was recorded before it was called, not for a moment with nothing pending."""
        chatted = 0

        async def chatter(recorder: RunRecorder) -> None:
            nonlocal chatted
            while True:  # a command printing without pause: events arrive during every write
                await recorder(line(chatted))
                chatted += 1
                await anyio.lowlevel.checkpoint()

        async with RunRecorder(store) as recorder, anyio.create_task_group() as tg:
            await recorder(started())
            tg.start_soon(chatter, recorder)
            await recorder(line(-1))
            with anyio.fail_after(10):
                await recorder.flush()
            written = recorder.statistics().rows
            tg.cancel_scope.cancel()
        assert written >= 2  # the run and its stage, with line -1
        assert chatted > 0

    async def test_flush_works_while_the_block_is_cancelled(self, store: SqliteStore) -> None:
        """While an enclosing scope is cancelled (runs rolling back, shielded), the writer still writes."""
        flushed = False
        with anyio.CancelScope() as outer:
            async with RunRecorder(store, flush_interval=3_600, batch_size=1_000) as recorder:
                outer.cancel()
                with anyio.CancelScope(shield=True):
                    await anyio.wait_all_tasks_blocked()  # everything saw the cancellation
                    await recorder(started())
                    with anyio.fail_after(5):
                        await recorder.flush()
                    flushed = recorder.statistics().pending == 0
                await anyio.lowlevel.checkpoint()  # the cancellation
        assert outer.cancelled_caught
        assert flushed


# -- the engine with a store -----------------------------------------------------------------


class TestEngineStore:
    async def test_a_failed_history_write_does_not_mask_the_blocks_error(self, tmp_path: Path) -> None:
        """The engine block's own error propagates, with a note that the history was not written."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))

        async def scenario() -> None:
            async with FailingStore(tmp_path / "x.db") as store, pk.Engine(store=store) as engine:
                await engine.execute(pipeline)
                raise KeyError("boom")

        with structlog.testing.capture_logs(), pytest.raises(ExceptionGroup) as caught:
            await scenario()
        (error,) = caught.value.exceptions
        assert isinstance(error, KeyError)
        assert any("the run history was not fully written" in note for note in getattr(caught.value, "__notes__", []))

    async def test_a_failed_history_write_does_not_swallow_cancellation(self, tmp_path: Path) -> None:
        """An engine block cancelled from outside ends cancelled; the failed write is logged, not raised."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        with structlog.testing.capture_logs() as logs:
            async with FailingStore(tmp_path / "x.db") as store:
                with anyio.CancelScope() as scope:
                    async with pk.Engine(store=store) as engine:
                        await engine.execute(pipeline)
                        scope.cancel()
                        await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert any(e["event"] == "pipekit.store.write_failed" and e.get("final") for e in logs)

    async def test_a_failed_history_write_is_raised_after_a_clean_block(self, tmp_path: Path) -> None:
        """Without another error, leaving the engine raises the store's error (the history was lost)."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("a"))
        with structlog.testing.capture_logs(), pytest.raises(StoreError, match="database or disk is full"):
            async with FailingStore(tmp_path / "x.db") as store, pk.Engine(store=store) as engine:
                await engine.execute(pipeline)

    async def test_entering_in_a_cancelled_scope(self, store: SqliteStore) -> None:
        """An engine with a store entered under a cancelled scope leaves nothing open."""
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with pk.Engine(store=store):
                pass
        assert scope.cancelled_caught


# -- commands: process groups, pipes and log files ------------------------------------------------


@pytest.fixture
def marker() -> Iterator[str]:
    """Unique digits to put in the command lines of the processes a test starts (ends leftovers afterwards)."""
    token = new_marker()
    yield token
    for process in survivors(token):  # only when a test failed: don't leak its processes
        process.kill()


def py(code: str, *args: str) -> list[str]:
    """The arguments running ``code`` (dedented) with this test's Python interpreter."""
    return [PY, "-c", textwrap.dedent(code), *args]


def chatty_daemon(ready: Path, seconds: float) -> str:
    """Python code that leaves the process group (``setsid``), then prints a line every 0.1 s for ``seconds``."""
    return f"""
        import os, pathlib, sys, time
        os.setsid()
        pathlib.Path({str(ready)!r}).touch()
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            print("tick", flush=True)
            time.sleep(0.1)
    """


@POSIX
class TestCommandTermination:
    async def test_a_daemon_that_keeps_printing_does_not_hold_the_stage(self, tmp_path: Path, marker: str) -> None:
        """A daemon outside the group printing on the inherited pipes forever: the stage ends soon anyway."""
        ready = tmp_path / "ready"
        daemon = shlex.join(py(chatty_daemon(ready, 12), marker))
        script = f"{daemon} & while [ ! -e {ready} ]; do sleep 0.01; done; echo started"
        start = anyio.current_time()

        response = await pk.Pipeline("ci").add_stage(CommandStage("start", script, shell=True)).execute()

        assert anyio.current_time() - start < 8  # not the daemon's 12 s
        assert response.ok, response.error
        assert "started" in response.outputs["start"].stdout.splitlines()

    async def test_a_daemon_that_keeps_printing_does_not_hold_a_timed_out_stage(
        self, tmp_path: Path, marker: str
    ) -> None:
        """The same daemon cannot hold the shielded clean-up of a stage that timed out."""
        ready = tmp_path / "ready"
        daemon = shlex.join(py(chatty_daemon(ready, 12), marker))
        script = f"{daemon} & while [ ! -e {ready} ]; do sleep 0.01; done; echo started; sleep 30"
        start = anyio.current_time()

        response = await pk.Pipeline("ci").add_stage(CommandStage("start", script, shell=True, timeout=0.5)).execute()

        assert anyio.current_time() - start < 8
        assert response.status is pk.Status.TIMED_OUT

    async def test_a_cancel_during_kill_grace_still_sigkills_the_group(self, marker: str) -> None:
        """Cancelled while its group has its SIGTERM grace, the stage still SIGKILLs what ignored SIGTERM."""
        stubborn = """
            import signal, time
            signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))
            print("ready", flush=True)
            while True:
                time.sleep(1)
        """
        script = f"(trap '' TERM; exec sleep 61.{marker}) & {shlex.join(py(stubborn, marker))} & wait"
        scope = anyio.CancelScope()

        async def hook(event: pk.Event) -> None:
            if isinstance(event, OutputLine) and event.line == "term":  # in the grace period
                scope.cancel()

        stage = CommandStage("hang", script, shell=True, timeout=0.5, kill_grace=1.0)
        start = anyio.current_time()
        with scope:
            await pk.Pipeline("ci").add_stage(stage).execute(hooks=[hook])
        elapsed = anyio.current_time() - start

        assert scope.cancelled_caught
        assert survivors(marker) == []
        assert 0.5 + 1.0 <= elapsed < 10  # the grace ran out despite the cancel: then the SIGKILL

    async def test_a_rollback_command_cut_short_by_the_rollback_timeout_is_killed(
        self, tmp_path: Path, marker: str
    ) -> None:
        """A rollback command still running when the rollback timeout fires: its whole group is ended."""
        undo = f"echo undoing; (trap '' TERM; exec sleep 62.{marker}) & sleep 63.{marker}; touch {tmp_path / 'undone'}"
        pipeline = (
            pk.Pipeline("deploy")
            .add_stage(CommandStage("prepare", "true", rollback_command=undo, shell=True, kill_grace=0.3))
            .add_stage(MockStage("release", error="registry down"))
            .with_rollback(timeout=0.5)
        )
        start = anyio.current_time()
        with capture_events() as events:
            response = await pipeline.execute()
        elapsed = anyio.current_time() - start

        assert response.status is pk.Status.FAILED
        assert isinstance(response.stages["prepare"].rollback_error, pk.RollbackTimeoutError)
        assert [e.line for e in events.of(OutputLine)] == ["undoing"]
        assert survivors(marker) == []
        assert not (tmp_path / "undone").exists()
        assert elapsed < 0.5 + 0.3 + 5  # the timeout, the grace, then the SIGKILL


class SlowFile:
    """An open file whose writes take ``delay`` more seconds, which no cancellation cuts short (a worker thread)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def write(self, text: str) -> int:
        written: int = await self.inner.write(text)
        with anyio.CancelScope(shield=True):
            await anyio.sleep(self.delay)
        return written

    async def aclose(self) -> None:
        await self.inner.aclose()


class TestLogFile:
    @pytest.mark.pipekit_clock
    async def test_the_log_file_is_closed_after_a_slow_last_write(
        self, tmp_path: Path, pipekit_clock: FakeClock
    ) -> None:
        """A last write that outlasts the clean-up's bound still leaves the file whole and closed."""
        sink = _LogFile(tmp_path / "build.log", "make")
        await sink.open()
        real = sink._file
        sink._file = SlowFile(real, delay=11)
        await sink.write("compiling")

        await sink.aclose()

        assert real.closed
        assert (tmp_path / "build.log").read_text(encoding="utf-8") == "$ make\ncompiling\n"
        assert sink.error is None
        assert pipekit_clock.elapsed() >= 11


# -- the runner: the max_parallel limiter and pre-flight validators --------------------------------


def limited(max_parallel: int) -> pk.PipelineRequest:
    """A request running at most ``max_parallel`` stages at once."""
    return pk.PipelineRequest(options=pk.RequestOptions(max_parallel=max_parallel))


class HangingValidator:
    """A pre-flight check that never answers (a registry that does not respond)."""

    def __init__(self) -> None:
        self.started = anyio.Event()

    async def validate(self, ctx: pk.StageContext) -> None:
        self.started.set()
        await anyio.sleep_forever()


@pytest.mark.pipekit_clock
class TestRunnerCancellation:
    async def test_cancel_reaches_stages_waiting_for_the_only_slot(self, pipekit_clock: FakeClock) -> None:
        """max_parallel=1: cancelling while stages queue for the slot ends the run, rolls back, skips the rest."""
        first = MockStage("first")
        held = MockStage("held", block=True)
        queued = [MockStage(f"queued-{n}") for n in range(3)]
        pipeline = pk.Pipeline("p").add_stage(first).add_parallel_stages(held, *queued)

        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline, limited(1))
            await held.wait_started()
            with anyio.fail_after(5):
                response = await handle.cancel()

        assert response.status is pk.Status.CANCELLED
        assert response.stages["first"].rolled_back
        assert response.stages["held"].status is pk.Status.CANCELLED
        assert [response.stages[s.name].status for s in queued] == [pk.Status.SKIPPED] * 3
        assert [s.call_count for s in queued] == [0, 0, 0]
        assert pipekit_clock.elapsed() == 0

    async def test_a_failure_while_stages_queue_for_the_only_slot(self) -> None:
        """max_parallel=1 with retries and a nested pipeline: a failure rolls back everything done, no deadlock."""
        flaky = MockStage("flaky", fail_times=1)
        inner = pk.Pipeline("inner").add_stage(MockStage("i1")).add_stage(MockStage("i2"))
        broken = MockStage("broken", error="disk full")
        pipeline = (
            pk.Pipeline("p")
            .add_stage(MockStage("first"))
            .add_parallel_stages(flaky, inner, broken, retry=pk.RetryPolicy(max_attempts=2, initial_delay=1))
        )

        with anyio.fail_after(60):
            response = await pipeline.execute(limited(1))

        assert response.status is pk.Status.FAILED
        assert "broken" in str(response.error)
        assert response.stages["first"].rolled_back
        assert all(r.status is not pk.Status.RUNNING for r in response.stages.values())

    async def test_a_hanging_validator_is_cut_short_by_the_run_timeout(self, pipekit_clock: FakeClock) -> None:
        """Pre-flight validation runs inside the run's deadline: the run times out, nothing executes."""
        stage = MockStage("build")
        pipeline = pk.Pipeline("p").add_stage(stage).with_validators(HangingValidator()).with_timeout(30)

        response = await pipeline.execute()

        assert response.status is pk.Status.TIMED_OUT
        assert stage.call_count == 0
        assert pipekit_clock.elapsed() == 30

    async def test_a_hanging_validator_is_cut_short_by_cancel(self, pipekit_clock: FakeClock) -> None:
        """``handle.cancel()`` during pre-flight validation ends the run cancelled, nothing executed."""
        validator = HangingValidator()
        stage = MockStage("build")
        pipeline = pk.Pipeline("p").add_stage(stage).with_validators(validator)

        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline)
            await validator.started.wait()
            response = await handle.cancel()

        assert response.status is pk.Status.CANCELLED
        assert stage.call_count == 0
        assert pipekit_clock.elapsed() == 0


# -- the pipekit command: signals --------------------------------------------------------------------


SLOW_ROLLBACK = """
name: slow
stages:
  - name: prepare
    shell: true
    command: echo ready
    rollback: touch rolling; sleep 2; touch undone
  - name: wait
    shell: true
    command: touch started; sleep 30
"""


@POSIX
class TestCliSignals:
    async def test_a_second_ctrl_c_does_not_cut_the_rollback_short(
        self, tmp_path: Path, anyio_backend_name: str
    ) -> None:
        """Ctrl-C again while rolling back only says so: the rollback finishes, the run is recorded, exit 130."""
        (tmp_path / "slow.yaml").write_text(SLOW_ROLLBACK, encoding="utf-8")
        args = ["run", "slow.yaml", "--db", "h.db", "--plain", "--backend", anyio_backend_name]

        returncode, out, err = await signal_cli(
            tmp_path, args, [("started", signal.SIGINT), ("rolling", signal.SIGINT)]
        )

        assert returncode == 130, (out, err)
        assert (tmp_path / "undone").exists()
        assert "still rolling back; the command ends when the rollback has finished" in out
        assert "Traceback" not in err
        async with SqliteStore(tmp_path / "h.db") as store:
            (run,) = (await store.list_runs()).runs
        assert run.status == "cancelled"

    async def test_sigterm_cancels_rolls_back_and_exits_143(self, tmp_path: Path, anyio_backend_name: str) -> None:
        """SIGTERM (a CI runner stopping the job) cancels and rolls back like Ctrl-C, then exits 143."""
        (tmp_path / "slow.yaml").write_text(SLOW_ROLLBACK, encoding="utf-8")
        args = ["run", "slow.yaml", "--db", "h.db", "--plain", "--backend", anyio_backend_name]

        returncode, out, err = await signal_cli(tmp_path, args, [("started", signal.SIGTERM)])

        assert returncode == 143, (out, err)
        assert (tmp_path / "undone").exists()
        assert "SIGTERM: cancelling the run; waiting for its rollback to finish" in out
        assert "Traceback" not in err
        async with SqliteStore(tmp_path / "h.db") as store:
            (run,) = (await store.list_runs()).runs
        assert run.status == "cancelled"

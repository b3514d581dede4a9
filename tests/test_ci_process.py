"""CommandStage's process handling, with real commands in real pipelines.

Output is streamed line by line while the command runs; tails stay bounded;
log files get everything; and a timeout, a cancellation or a command exiting
early leaves no process of its group behind (checked with psutil).
"""

from __future__ import annotations

import shlex
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing

import pipekit as pk
from pipekit.ci import CommandError, CommandResult, CommandStage, OutputLine, Secret
from pipekit.ci._process import MAX_LINE
from pipekit.testing import capture_events
from tests.helpers import new_marker, survivors

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")

PY = sys.executable


def py(code: str, *args: str) -> list[str]:
    """The arguments running ``code`` (dedented) with this test's Python interpreter."""
    return [PY, "-c", textwrap.dedent(code), *args]


async def run_one(
    stage: CommandStage,
    *,
    input: Mapping[str, Any] | None = None,  # noqa: A002 - as execute() names it
    hooks: Sequence[pk.Hook] = (),
) -> pk.PipelineResponse:
    """Run a pipeline of ``stage`` alone."""
    return await pk.Pipeline("ci").add_stage(stage).execute(input=input, hooks=hooks)


async def lines_of(stage: CommandStage) -> tuple[CommandResult, list[tuple[str, str]]]:
    """Run ``stage`` alone; return its result and the (stream, line) of its OutputLine events."""
    with capture_events() as events:
        response = await run_one(stage)
    assert response.ok, response.error
    result = response.outputs[stage.name]
    assert isinstance(result, CommandResult)
    return result, [(e.stream, e.line) for e in events.of(OutputLine)]


# -- processes ----------------------------------------------------------------


@pytest.fixture
def marker() -> Iterator[str]:
    """Unique digits to put in the command lines of the processes a test starts (ends leftovers afterwards)."""
    token = new_marker()
    yield token
    for process in survivors(token):  # only when a test failed: don't leak its processes
        process.kill()


def sleeper(marker: str, seconds: int = 60) -> str:
    """A ``sleep`` command whose command line carries ``marker`` (as the fraction of its seconds)."""
    return f"sleep {seconds}.{marker}"


class TestStreaming:
    """Lines arrive as they are printed, tagged, logged and cleaned up."""

    async def test_output_arrives_while_the_command_runs(self, tmp_path: Path) -> None:
        """The command waits for a file that the test creates only once it saw the first line."""
        go = tmp_path / "go"
        seen: list[tuple[str, bool]] = []

        async def hook(event: pk.Event) -> None:
            if isinstance(event, OutputLine):
                seen.append((event.line, await anyio.Path(go).exists()))
                if event.line == "waiting":
                    await anyio.Path(go).touch()

        code = """
            import pathlib, sys, time
            print("waiting", flush=True)
            deadline = time.monotonic() + 10
            while not pathlib.Path(sys.argv[1]).exists():
                if time.monotonic() > deadline:
                    sys.exit("the test never created the file: output is not streamed")
                time.sleep(0.005)
            print("done")
        """
        stage = CommandStage("wait", py(code, str(go)), timeout=20)

        response = await run_one(stage, hooks=[hook])

        assert response.ok, response.error
        assert seen == [("waiting", False), ("done", True)]
        assert response.outputs["wait"].stdout == "waiting\ndone\n"

    async def test_stdout_and_stderr_are_tagged(self) -> None:
        """Each line says which stream it came from, and which stage and attempt printed it."""
        code = """
            import sys
            print("to out", flush=True)
            print("to err", file=sys.stderr, flush=True)
        """
        with capture_events() as events:
            response = await run_one(CommandStage("tag", py(code)))

        assert response.ok, response.error
        # Two pipes: which line is read first is up to the scheduler.
        assert sorted((e.stream, e.line, e.stage, e.attempt) for e in events.of(OutputLine)) == [
            ("stderr", "to err", "tag", 1),
            ("stdout", "to out", "tag", 1),
        ]
        assert response.outputs["tag"].stdout == "to out\n"
        assert response.outputs["tag"].stderr == "to err\n"

    async def test_lines_go_to_the_stage_log(self) -> None:
        """``ctx.log`` gets a ``pipekit.ci.output`` entry per line, bound to the stage."""
        with structlog.testing.capture_logs() as logs:
            response = await run_one(CommandStage("log", ["sh", "-c", "echo one; echo two >&2"]))

        assert response.ok, response.error
        output = [entry for entry in logs if entry["event"] == "pipekit.ci.output"]
        assert sorted((e["stream"], e["line"], e["stage"], e["attempt"], e["log_level"]) for e in output) == [
            ("stderr", "two", "log", 1, "info"),
            ("stdout", "one", "log", 1, "info"),
        ]

    async def test_crlf_line_endings_are_removed(self) -> None:
        """A CRLF line ending goes; a carriage return inside a line (a progress bar) stays."""
        result, lines = await lines_of(CommandStage("crlf", ["printf", r"a\r\nb\r\n10%%\r20%%\n"]))

        assert lines == [("stdout", "a"), ("stdout", "b"), ("stdout", "10%\r20%")]
        assert result.stdout == "a\nb\n10%\r20%\n"

    async def test_a_very_long_line_arrives_in_pieces(self) -> None:
        """A line longer than `MAX_LINE` bytes arrives in pieces of at most that, which add up to it."""
        length = 2 * MAX_LINE + 1000
        code = f"import sys; sys.stdout.write('x' * {length} + 'END\\n'); print('next')"

        _, lines = await lines_of(CommandStage("long", py(code)))

        pieces = [line for _, line in lines]
        assert [len(p) for p in pieces] == [MAX_LINE, MAX_LINE, 1003, 4]
        assert "".join(pieces[:3]) == "x" * length + "END"
        assert pieces[3] == "next"

    async def test_long_lines_are_cut_between_characters(self) -> None:
        """Pieces of a long line of multi-byte characters end on character boundaries."""
        text = "x" + "\u00e9" * MAX_LINE  # 2 * MAX_LINE + 1 bytes: a cut at MAX_LINE bytes would split a character
        code = f"print('x' + '\\u00e9' * {MAX_LINE})"

        _, lines = await lines_of(CommandStage("accents", py(code)))

        pieces = [line for _, line in lines]
        assert len(pieces) == 3
        assert "".join(pieces) == text
        assert all(len(p.encode()) <= MAX_LINE for p in pieces)

    async def test_a_last_line_without_newline_is_kept(self) -> None:
        """Output that does not end with a newline still yields its last line."""
        result, lines = await lines_of(CommandStage("partial", ["printf", "one\\n\\ntwo"]))

        assert lines == [("stdout", "one"), ("stdout", ""), ("stdout", "two")]
        assert result.stdout == "one\n\ntwo\n"

    async def test_invalid_utf8_is_replaced(self) -> None:
        """Bytes that are not UTF-8 become U+FFFD instead of failing the stage."""
        code = r"import sys; sys.stdout.buffer.write(b'caf\xe9 ok\n'); sys.stderr.buffer.write(b'\xff\xfe\n')"

        result, lines = await lines_of(CommandStage("bytes", py(code)))

        assert sorted(lines) == [("stderr", "\ufffd\ufffd"), ("stdout", "caf\ufffd ok")]
        assert result.stderr == "\ufffd\ufffd\n"

    async def test_a_silent_command_has_empty_output(self) -> None:
        """No output: empty tails and no events."""
        result, lines = await lines_of(CommandStage("silent", ["true"]))

        assert lines == []
        assert (result.stdout, result.stderr, result.truncated) == ("", "", False)


class TestTails:
    """The result keeps a bounded tail of each stream."""

    async def test_a_megabyte_of_output_keeps_only_the_tail(self) -> None:
        """About 1 MB printed, ``tail_bytes=1000``: at most 1000 bytes kept, the last line among them."""
        code = """
            for i in range(2000):
                print(f"{i:04d}", "." * 495)  # 500 bytes a line, newline included
            print("the end")
        """
        with capture_events() as events:
            response = await run_one(CommandStage("chatty", py(code), tail_bytes=1000))

        result = response.outputs["chatty"]
        assert len(result.stdout.encode()) <= 1000
        assert result.truncated is True
        assert result.stdout.endswith("the end\n")
        assert result.stdout == f"1999 {'.' * 495}\nthe end\n"  # whole lines only
        assert len(events.of(OutputLine)) == 2001  # every line was still streamed

    async def test_a_tail_within_the_limit_is_whole(self) -> None:
        """Output smaller than ``tail_bytes`` is kept whole and not marked truncated."""
        result, _ = await lines_of(CommandStage("small", ["sh", "-c", "echo aaaa; echo bbbb"], tail_bytes=10))

        assert (result.stdout, result.truncated) == ("aaaa\nbbbb\n", False)

    async def test_the_oldest_lines_are_dropped_first(self) -> None:
        """Each stream has its own tail; older lines go first."""
        stage = CommandStage("drop", ["sh", "-c", "echo aaaa; echo bbbb; echo cccc; echo e >&2"], tail_bytes=10)

        result, _ = await lines_of(stage)

        assert (result.stdout, result.stderr, result.truncated) == ("bbbb\ncccc\n", "e\n", True)

    async def test_a_line_longer_than_the_tail_keeps_its_end(self) -> None:
        """A last line longer than ``tail_bytes`` is cut at its start, not dropped."""
        code = "import sys; print('x' * 5000 + ' the real error', file=sys.stderr); sys.exit(1)"

        response = await run_one(CommandStage("wide", py(code), tail_bytes=100))

        error = response.error.__cause__ if response.error is not None else None
        assert isinstance(error, pk.PipekitError)
        assert error.stderr == "x" * 84 + " the real error\n"  # type: ignore[attr-defined]
        assert str(error).endswith("stderr ends with: " + "x" * 84 + " the real error")


class TestLogFile:
    """``log_file=`` receives the whole output, masked, after a ``$ command`` header."""

    async def test_everything_is_appended(self, tmp_path: Path) -> None:
        """The file gets every line even when the tail keeps few; a second run appends."""
        log_file = tmp_path / "logs" / "build.log"
        code = """
            import sys
            for i in range(3000):
                print("line", i)
            print("oops", file=sys.stderr)
        """
        stage = CommandStage("build", py(code), tail_bytes=50, log_file=log_file)

        first = await run_one(stage)
        second = await run_one(stage)

        assert first.ok
        assert second.ok
        header = f"$ {shlex.join(first.outputs['build'].args)}\n"
        body = "".join(f"line {i}\n" for i in range(3000))
        text = log_file.read_text(encoding="utf-8")
        assert text.count(header) == 2
        assert text.startswith(header)
        assert "oops\n" in text
        assert text.replace("oops\n", "") == (header + body) * 2
        assert first.outputs["build"].truncated is True

    async def test_secrets_are_masked_in_the_file(self, tmp_path: Path) -> None:
        """The secret value never reaches the file; the output of a failed command does."""
        log_file = tmp_path / "deploy.log"
        stage = CommandStage(
            "deploy",
            ["sh", "-c", 'echo "token is $TOKEN"; echo "bad ${PASSWORD}" >&2; exit 1'],
            env={"TOKEN": Secret("tok-123")},
            log_file=log_file,
        )

        response = await run_one(stage, input={"PASSWORD": Secret("pw-456")})

        assert response.status is pk.Status.FAILED
        text = log_file.read_text(encoding="utf-8")
        assert "tok-123" not in text
        assert "pw-456" not in text
        assert "token is ***\n" in text
        assert "bad ***\n" in text
        assert text.startswith("$ sh -c ")

    @pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
    @pytest.mark.parametrize("lines", [1, 5000])  # written at the end / while the command runs
    async def test_a_full_disk_fails_the_stage_clearly(self, tmp_path: Path, lines: int) -> None:
        """A log file write that fails: the command runs to its end, then a one-line CommandError."""
        code = f"import pathlib; [print('x' * 40) for _ in range({lines})]; pathlib.Path('ran').touch()"
        stage = CommandStage("build", py(code), cwd=tmp_path, log_file="/dev/full")

        response = await run_one(stage)

        cause = response.error.__cause__ if response.error is not None else None
        assert type(cause) is CommandError
        assert str(cause) == "cannot write the log file '/dev/full': No space left on device"
        assert (tmp_path / "ran").exists()

    async def test_a_log_file_that_cannot_be_written(self, tmp_path: Path) -> None:
        """The command does not start; the error names the log file, on one line."""
        (tmp_path / "logs").write_text("a file, not a directory")
        log_file = tmp_path / "logs" / "build.log"
        stage = CommandStage("build", ["touch", str(tmp_path / "ran")], log_file=log_file)

        response = await run_one(stage)

        cause = response.error.__cause__ if response.error is not None else None
        assert type(cause) is CommandError
        assert str(cause) == f"cannot write the log file {str(log_file)!r}: Not a directory"
        assert not (tmp_path / "ran").exists()


class TestTermination:
    """Timeouts, cancellation and early exits end the command's whole process group."""

    async def test_a_timeout_kills_the_process_tree(self, tmp_path: Path, marker: str) -> None:
        """Grandchildren die too; those ignoring SIGTERM are SIGKILLed after ``kill_grace``."""
        pids = tmp_path / "pids"
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        script = f"""
            {sleeper(marker)} &
            echo $! > {pids}
            (trap '' TERM; exec {sleeper(marker, 61)}) &
            echo $! >> {pids}
            {shlex.join(py(stubborn, marker))} &
            echo $! >> {pids}
            echo started
            wait
        """
        stage = CommandStage("hang", ["sh", "-c", textwrap.dedent(script)], timeout=0.5, kill_grace=0.3)
        start = anyio.current_time()

        with capture_events() as events:
            response = await run_one(stage)

        elapsed = anyio.current_time() - start
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert [e.line for e in events.of(OutputLine)] == ["started"]
        assert len(pids.read_text().split()) == 3
        assert survivors(marker) == []
        assert elapsed >= 0.5 + 0.3  # the SIGTERM-ignoring sleep needed the SIGKILL

    async def test_cancelling_an_execution_kills_the_process_tree(self, marker: str) -> None:
        """``handle.cancel()`` ends the group: a Python child ignoring SIGTERM is SIGKILLed."""
        stubborn = """
            import signal, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(60)
        """
        script = f"{sleeper(marker)} & {shlex.join(py(stubborn, marker))} & wait"
        ready = anyio.Event()

        async def hook(event: pk.Event) -> None:
            if isinstance(event, OutputLine) and event.line == "ready":
                ready.set()

        pipeline = (
            pk.Pipeline("ci").add_stage(CommandStage("hang", script, shell=True, kill_grace=0.3)).with_hooks(hook)
        )
        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline)
            with anyio.fail_after(10):
                await ready.wait()
            assert len(survivors(marker)) == 3  # sh, sleep and python are running
            start = anyio.current_time()
            response = await handle.cancel()
            elapsed = anyio.current_time() - start

        assert response.status is pk.Status.CANCELLED
        assert survivors(marker) == []
        assert elapsed >= 0.3  # SIGTERM was ignored: only the SIGKILL after the grace ended it

    async def test_cancelling_the_caller_kills_the_process_tree(self, marker: str) -> None:
        """A cancel scope around ``pipeline.execute()`` ends the command's group before it exits."""
        scope = anyio.CancelScope()

        async def hook(event: pk.Event) -> None:
            if isinstance(event, OutputLine):
                scope.cancel()

        stage = CommandStage("hang", f"{sleeper(marker)} & echo started; wait", shell=True)
        with scope:
            await pk.Pipeline("ci").add_stage(stage).execute(hooks=[hook])

        assert scope.cancelled_caught
        assert survivors(marker) == []

    async def test_children_left_running_are_ended(self, tmp_path: Path, marker: str) -> None:
        """A command that exits leaving background processes succeeds, and they are ended."""
        pids = tmp_path / "pids"
        script = f"""
            {sleeper(marker)} &
            echo $! > {pids}
            {sleeper(marker)} > /dev/null 2>&1 &
            echo $! >> {pids}
            echo done
        """
        stage = CommandStage("leave", ["sh", "-c", textwrap.dedent(script)], kill_grace=5)
        start = anyio.current_time()

        response = await run_one(stage)

        assert response.ok, response.error
        assert response.outputs["leave"].returncode == 0
        assert response.outputs["leave"].stdout == "done\n"
        assert len(pids.read_text().split()) == 2
        assert survivors(marker) == []
        # SIGTERM sufficed, and the ended orphans (zombies until init reaps them) were not waited for.
        assert anyio.current_time() - start < 1

    async def test_an_unfinished_line_is_kept_when_the_command_is_interrupted(self, tmp_path: Path) -> None:
        """Text printed without a newline before a hang reaches the events and the log file despite the timeout."""
        log_file = tmp_path / "wait.log"
        stage = CommandStage(
            "wait", "printf 'waiting for the database...'; sleep 30", shell=True, timeout=0.5, log_file=log_file
        )

        with capture_events() as events:
            response = await run_one(stage)

        assert response.status is pk.Status.TIMED_OUT
        assert [e.line for e in events.of(OutputLine)] == ["waiting for the database..."]
        assert log_file.read_text(encoding="utf-8").endswith("\nwaiting for the database...\n")

    async def test_output_printed_after_sigterm_is_kept(self) -> None:
        """What a command prints while it handles SIGTERM (in the grace period) is streamed, before it ends."""
        script = "trap 'echo cleaning up; exit 3' TERM; echo started; sleep 30 & wait"
        stage = CommandStage("serve", script, shell=True, timeout=0.5, kill_grace=5)

        with capture_events() as events:
            response = await run_one(stage)

        assert response.status is pk.Status.TIMED_OUT
        assert [e.line for e in events.of(OutputLine)] == ["started", "cleaning up"]
        kinds = [type(e) for e in events.events if e.stage == "serve"]
        assert kinds.index(pk.StageFailed) > max(i for i, k in enumerate(kinds) if k is OutputLine)

    async def test_a_process_outside_the_group_does_not_hold_the_stage(self, tmp_path: Path, marker: str) -> None:
        """A daemon that left the group (``setsid``) and keeps the pipes open: the stage ends anyway."""
        ready = tmp_path / "ready"
        daemon = f"import os, pathlib, time; os.setsid(); pathlib.Path({str(ready)!r}).touch(); time.sleep(20)"
        script = f"{shlex.join(py(daemon, marker))} & while [ ! -e {ready} ]; do sleep 0.01; done; echo started"
        stage = CommandStage("start", script, shell=True)
        start = anyio.current_time()

        result, lines = await lines_of(stage)

        assert anyio.current_time() - start < 10  # not the daemon's 20 s
        assert result.stdout == "started\n"
        assert lines == [("stdout", "started")]
        assert len(survivors(marker)) == 1  # out of reach, as documented (the fixture ends it)

    async def test_a_slow_subscriber_loses_no_output(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Lines still being handled when the command has exited are all kept (only silence ends the reading)."""
        monkeypatch.setattr("pipekit.ci._process._DRAIN_IDLE", 0.05)

        async def slow(event: pk.Event) -> None:
            if isinstance(event, OutputLine) and event.line == "line 0":
                await anyio.sleep(0.3)  # the command has long exited when this returns

        response = await run_one(CommandStage("chatty", py("for i in range(3): print('line', i)")), hooks=[slow])

        assert response.ok, response.error
        assert response.outputs["chatty"].stdout == "line 0\nline 1\nline 2\n"

    async def test_a_killed_command_reports_the_signal(self) -> None:
        """A command killed by a signal fails with a negative return code, named in the message."""
        # ``$$`` is pipekit's escape for a literal ``$``: the shell's own ``$$`` is written ``$$$$``.
        response = await run_one(CommandStage("die", ["sh", "-c", "echo bye >&2; kill -KILL $$$$"]))

        cause = response.error.__cause__ if response.error is not None else None
        assert isinstance(cause, pk.PipekitError)
        assert cause.returncode == -9  # type: ignore[attr-defined]
        assert "was killed by SIGKILL; stderr ends with: bye" in str(cause)

"""Tests for what ``pipekit run`` shows: the live (terminal) view, plain lines, the summary and the JSON document.

The live view is rendered to a recording `rich.console.Console` with a forced
terminal, not through a real TTY.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

import pipekit as pk
from pipekit.ci import CommandStage, OutputLine
from pipekit.cli._display import (
    JsonDisplay,
    LiveDisplay,
    PlainDisplay,
    RunView,
    error_text,
    response_document,
    seconds,
    summary_lines,
    summary_table,
)
from pipekit.testing import MockStage

T0 = 1_000_000.0
NO_RETRY = pk.RetryPolicy(max_attempts=1)


def terminal() -> Console:
    return Console(record=True, force_terminal=True, width=100, color_system="standard")


def rendered(view: RunView, now: float) -> str:
    console = terminal()
    console.print(view.render(now))
    return console.export_text()


def ev(kind: type[pk.Event], at: float = 0.0, **fields: object) -> pk.Event:
    """An event of pipeline ``release`` at ``T0 + at`` seconds."""
    fields.setdefault("pipeline", "release")
    return kind(request_id="r1", timestamp=T0 + at, **fields)  # type: ignore[arg-type]


def release() -> pk.Pipeline:
    return (
        pk.Pipeline("release").add_stage(MockStage("build")).add_stage(MockStage("test")).add_stage(MockStage("deploy"))
    )


def row(text: str, stage: str) -> str:
    (line,) = [line for line in text.splitlines() if f" {stage} " in line and "│" not in line]
    return line


class TestRunView:
    def test_lists_every_stage_as_pending_first(self) -> None:
        """Before any event, every stage of the pipeline is listed as pending."""
        text = rendered(RunView(release()), T0)
        assert text.splitlines()[0].startswith("pipeline release  pending")
        for stage in ("build", "test", "deploy"):
            assert "pending" in row(text, stage)

    def test_running_stage_shows_attempt_and_elapsed_time(self) -> None:
        """A running stage shows its attempt and how long it has been running."""
        view = RunView(release())
        view.apply(ev(pk.PipelineStarted))
        view.apply(ev(pk.StageStarted, 1.0, stage="build", attempt=1))
        text = rendered(view, T0 + 3.5)
        assert text.splitlines()[0] == "pipeline release  running  3.50s"
        line = row(text, "build")
        assert "▶" in line
        assert "running" in line
        assert line.split()[3:5] == ["1", "2.50s"]

    def test_every_state(self) -> None:
        """Each kind of event moves a stage to the state it names, with its error or reason."""
        view = RunView(release().add_stage(MockStage("notify")).add_stage(MockStage("restored")))
        view.apply(ev(pk.PipelineStarted))
        view.apply(ev(pk.StageStarted, stage="build", attempt=1))
        view.apply(ev(pk.StageSucceeded, 1.0, stage="build", attempt=2, duration=1.25))
        view.apply(ev(pk.StageStarted, 1.0, stage="test", attempt=1))
        view.apply(ev(pk.StageRetrying, 2.0, stage="test", attempt=1, error=ValueError("flaky"), delay=1.0))
        assert "attempt 1: ValueError: flaky" in row(rendered(view, T0 + 2.0), "test")
        view.apply(ev(pk.StageFailed, 3.0, stage="test", attempt=2, duration=2.0, error=RuntimeError("boom")))
        view.apply(ev(pk.StageSkipped, 3.0, stage="deploy", reason="not started: stage 'test' failed"))
        view.apply(ev(pk.StageSucceeded, 0.0, stage="restored", attempt=0, restored=True))
        view.apply(ev(pk.StageStarted, 1.0, stage="notify", attempt=1))
        view.apply(ev(pk.StageCancelled, 1.5, stage="notify", attempt=1, reason="fail-fast"))
        text = rendered(view, T0 + 4.0)
        assert "succeeded" in row(text, "build")
        assert "1.25s" in row(text, "build")
        assert row(text, "test").split()[1:4] == ["test", "failed", "2"]
        assert "RuntimeError: boom" in row(text, "test")
        assert "not started: stage 'test' failed" in row(text, "deploy")
        assert "⊘" in row(text, "notify")
        assert "0.50s" in row(text, "notify")
        assert "output restored from the earlier run" in row(text, "restored")

    def test_rollback_states(self) -> None:
        """Stages being compensated show it, then whether their rollback worked."""
        view = RunView(release())
        view.apply(ev(pk.RollbackStarted, stages=("build", "test")))
        text = rendered(view, T0)
        assert "rolling back" in row(text, "build")
        assert "rolling back" in row(text, "test")
        view.apply(ev(pk.StageRolledBack, stage="build"))
        view.apply(ev(pk.StageRollbackFailed, stage="test", error=OSError("disk gone")))
        text = rendered(view, T0)
        assert "↺ " in row(text, "build")
        assert "rolled back" in row(text, "build")
        assert "rollback failed" in row(text, "test")
        assert "rollback: OSError: disk gone" in row(text, "test")

    def test_running_stages_show_the_tail_of_their_output(self) -> None:
        """The last lines a running command printed are shown under the table, stderr marked; not once it ended."""
        view = RunView(release(), tail_lines=2)
        view.apply(ev(pk.StageStarted, stage="build", attempt=1))
        for n in range(1, 4):
            view.apply(ev(OutputLine, stage="build", attempt=1, line=f"compiling {n}"))
        view.apply(ev(OutputLine, stage="build", attempt=1, line="warning: old", stream="stderr"))
        lines = rendered(view, T0).splitlines()
        assert lines[-2:] == ["  build │ compiling 3", "  build │ ! warning: old"]
        assert not any("compiling 1" in line or "compiling 2" in line for line in lines)
        view.apply(ev(pk.StageSucceeded, stage="build", attempt=1, duration=1.0))
        assert "compiling" not in rendered(view, T0)

    def test_nested_pipeline_stages_are_qualified(self) -> None:
        """Stages of a nested pipeline are listed as ``inner/stage``."""
        view = RunView(release())
        view.apply(ev(pk.PipelineStarted, pipeline="checks", parent="release"))
        view.apply(ev(pk.StageStarted, pipeline="checks", stage="lint", attempt=1))
        assert "running" in row(rendered(view, T0), "checks/lint")

    def test_finished_run_title(self) -> None:
        """Once the run finished, the title gives its outcome and duration."""
        view = RunView(release())
        view.apply(ev(pk.PipelineStarted))
        view.apply(ev(pk.PipelineFinished, 2.0, status=pk.Status.FAILED, duration=2.0, error=RuntimeError("x")))
        assert rendered(view, T0 + 60).splitlines()[0] == "pipeline release  FAILED  2.00s"
        assert view.error == "RuntimeError: x"

    def test_colours_on_a_terminal(self) -> None:
        """On a terminal, states are coloured (failed in bold red, succeeded in green)."""
        view = RunView(release())
        view.apply(ev(pk.StageSucceeded, stage="build", attempt=1, duration=1.0))
        view.apply(ev(pk.StageFailed, stage="test", attempt=1, duration=1.0, error=RuntimeError("boom")))
        console = terminal()
        console.print(view.render(T0))
        styled = console.export_text(styles=True)
        assert "\x1b[1;31mfailed" in styled
        assert "\x1b[32msucceeded" in styled


class TestLiveDisplay:
    async def test_follows_a_real_run(self) -> None:
        """Fed a real run's events, the live display redraws in place and ends with the summary table."""
        pipeline = (
            pk.Pipeline("release")
            .add_stage(CommandStage("build", ["echo", "built"]))
            .add_stage(MockStage("test", error="tests failed"), retry=NO_RETRY)
        )
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, width=100, color_system=None)
        display = LiveDisplay(console, RunView(pipeline), clock=lambda: T0)
        async with pk.Engine() as engine:
            handle = await engine.submit(pipeline)
            display.start()
            async for event in handle.events():
                display.event(event)
            display.stop()
            response = await handle.wait()
        display.finish(response, run_id="abc", notes=["run abc recorded in x.db"])
        text = out.getvalue()
        assert "\x1b[2K" in text  # redrawn in place
        last_frame = text.rsplit("pipeline release", 1)[-1]
        assert last_frame.startswith("  FAILED")
        assert "pipeline 'release' FAILED in " in text
        assert "✘ failed" in text
        assert "run abc recorded in x.db" in text

    def test_note_is_printed_above_the_table(self) -> None:
        """A note (an interruption) is printed, the live table stays."""
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, width=100, color_system=None)
        display = LiveDisplay(console, RunView(release()), clock=lambda: T0)
        display.start()
        display.note("Ctrl-C: cancelling the run")
        display.stop()
        assert "Ctrl-C: cancelling the run" in out.getvalue()


def failed_response() -> pk.PipelineResponse:
    pipeline = (
        pk.Pipeline("release")
        .add_stage(MockStage("build", output={"image": "app:1"}))
        .add_stage(MockStage("test", error="3 tests failed"), retry=NO_RETRY)
        .add_stage(MockStage("deploy"))
    )
    return pk.run(pipeline)


class TestSummary:
    def test_lines(self) -> None:
        """The plain summary: the outcome, one line per stage with status, attempts, time and detail, the error."""
        lines = summary_lines(failed_response())
        assert lines[0].startswith("pipeline 'release' FAILED in ")
        assert lines[1].split()[:4] == ["build", "rolled", "back", "1"]
        assert lines[2].split()[:3] == ["test", "failed", "1"]
        assert lines[2].endswith("MockStageError: 3 tests failed")
        assert "skipped" in lines[3]
        assert lines[4].startswith("error: StageFailedError: stage 'test' failed")

    def test_table(self) -> None:
        """The summary table has the outcome as its title and a row per stage."""
        console = terminal()
        console.print(summary_table(failed_response()))
        text = console.export_text()
        assert text.startswith("pipeline 'release' FAILED in ")
        assert "↺ rolled back" in text
        assert "✘ failed" in text
        assert "MockStageError: 3 tests failed" in text

    def test_text_is_not_markup(self) -> None:
        """Stage names and errors that look like rich markup are shown as they are."""
        pipeline = pk.Pipeline("p").add_stage(MockStage("[b]x", error="bad [red]thing[/red]"), retry=NO_RETRY)
        console = terminal()
        console.print(summary_table(pk.run(pipeline)))
        text = console.export_text()
        assert "[b]x" in text
        assert "bad [red]thing[/red]" in text
        view = RunView(pipeline)
        view.apply(ev(pk.StageFailed, pipeline="p", stage="[b]x", error=ValueError("[red]no[/red]")))
        assert "ValueError: [red]no[/red]" in rendered(view, T0)

    def test_document(self) -> None:
        """The JSON document holds the run and each stage, JSON types only."""
        response = failed_response()
        document = response_document(response, run_id="abc", retry_of="old")
        assert json.loads(json.dumps(document)) == document
        assert document["run_id"] == "abc"
        assert document["retry_of"] == "old"
        assert document["status"] == "failed"
        assert [s["status"] for s in document["stages"]] == ["rolled_back", "failed", "skipped"]
        assert document["stages"][1]["error"] == "MockStageError: 3 tests failed"

    @pytest.mark.parametrize(
        ("duration", "text"), [(None, "-"), (0.123, "0.12s"), (59.994, "59.99s"), (187.25, "3m07.2s")]
    )
    def test_seconds(self, duration: float | None, text: str) -> None:
        """Durations read as seconds, or minutes and seconds past a minute."""
        assert seconds(duration) == text

    def test_error_text_is_one_line(self) -> None:
        """An error is shown as ``Type: first line``, marking that there is more."""
        assert error_text(ValueError("first\nsecond")) == "ValueError: first ..."
        assert error_text(KeyError()) == "KeyError"
        assert error_text(None) is None


class TestPlainAndJsonDisplays:
    def test_plain_lines_have_no_escape_codes(self) -> None:
        """The plain display writes one uncoloured line per event, output lines prefixed by their stage."""
        out = io.StringIO()
        display = PlainDisplay(out)
        display.event(ev(pk.StageStarted, stage="build", attempt=1))
        display.event(ev(OutputLine, stage="build", attempt=1, line="compiling"))
        display.finish(failed_response(), run_id="abc", notes=["run abc recorded in x.db"])
        lines = out.getvalue().splitlines()
        assert lines[:2] == ["[release] build started", "[release] build | compiling"]
        assert lines[2].startswith("pipeline 'release' FAILED")
        assert lines[-1] == "run abc recorded in x.db"
        assert "\x1b" not in out.getvalue()

    def test_json_display_prints_only_the_document(self) -> None:
        """The JSON display prints nothing until the end, then one document."""
        out = io.StringIO()
        display = JsonDisplay(out, retry_of="old")
        display.event(ev(pk.StageStarted, stage="build", attempt=1))
        display.note("ignored")
        assert out.getvalue() == ""
        display.interrupted = True
        display.finish(failed_response(), run_id="abc")
        document = json.loads(out.getvalue())
        assert (document["run_id"], document["retry_of"], document["interrupted"]) == ("abc", "old", True)

"""CommandStage: real commands in real pipelines.

Results and errors, retries and timeouts, rollback commands, secrets,
``${NAME}`` expansion, dry runs, environments and definition errors. How
processes are run (streaming, tails, log files, killing process groups) is
tested in ``test_ci_process.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing

import pipekit as pk
from pipekit.ci import (
    CommandError,
    CommandFailedError,
    CommandNotFoundError,
    CommandResult,
    CommandStage,
    EnvVarValidator,
    OutputLine,
    Secret,
    ToolValidator,
)
from pipekit.testing import capture_events, capture_spans

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the commands are POSIX")

PY = sys.executable
DRY_RUN = pk.RequestOptions(dry_run=True)
NO_WAIT = pk.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
#: Prints its arguments as a JSON list.
ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def py(code: str, *args: str) -> list[str]:
    """The arguments running ``code`` (dedented) with this test's Python interpreter."""
    return [PY, "-c", textwrap.dedent(code), *args]


async def run_one(
    stage: CommandStage,
    *,
    input: Mapping[str, Any] | None = None,  # noqa: A002 - as execute() names it
    variables: Mapping[str, Any] | None = None,
) -> pk.PipelineResponse:
    """Run a pipeline of ``stage`` alone."""
    return await pk.Pipeline("ci").add_stage(stage).with_variables(variables).execute(input=input)


def result_of(response: pk.PipelineResponse, stage: str) -> CommandResult:
    """The CommandResult of ``stage`` in a successful run."""
    assert response.ok, response.error
    result = response.outputs[stage]
    assert isinstance(result, CommandResult)
    return result


def cause_of(response: pk.PipelineResponse) -> BaseException:
    """The original exception of a failed run (its StageFailedError's ``__cause__``)."""
    assert isinstance(response.error, pk.StageFailedError), response.error
    assert response.error.__cause__ is not None
    return response.error.__cause__


def flaky(counter: Path, failures: int) -> list[str]:
    """A command that fails its first ``failures`` runs (counted in ``counter``), then succeeds."""
    code = f"""
        import pathlib, sys
        counter = pathlib.Path(sys.argv[1])
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        print("attempt", n)
        if n <= {failures}:
            sys.exit(f"flaky failure {{n}}")
    """
    return py(code, str(counter))


class TestResult:
    """A successful command returns a CommandResult describing what ran."""

    async def test_result_fields(self) -> None:
        """args, returncode, both tails, duration and truncated."""
        code = "import sys; print('out'); print('err', file=sys.stderr)"

        result = result_of(await run_one(CommandStage("hello", py(code))), "hello")

        assert result == CommandResult(
            args=(PY, "-c", code),
            returncode=0,
            stdout="out\n",
            stderr="err\n",
            duration=result.duration,
            truncated=False,
        )
        assert 0 < result.duration < 10

    async def test_a_string_is_split_like_a_shell_would(self) -> None:
        """Without ``shell``, a string is split with shlex and run directly."""
        result = result_of(await run_one(CommandStage("split", "printf '%s|' 'a b' c")), "split")

        assert result.args == ("printf", "%s|", "a b", "c")
        assert result.stdout == "a b|c|\n"

    async def test_shell_true_runs_through_sh(self) -> None:
        """With ``shell=True`` pipes and ``&&`` work: the string runs as ``/bin/sh -c``."""
        command = "echo one | tr o 0 && echo two"

        result = result_of(await run_one(CommandStage("pipe", command, shell=True)), "pipe")

        assert result.args == ("/bin/sh", "-c", command)
        assert result.stdout == "0ne\ntwo\n"

    async def test_a_list_with_paths_runs_them(self, tmp_path: Path) -> None:
        """A list may hold path-like arguments; with ``shell=True`` it is joined, quoted."""
        path = tmp_path / "with space.txt"
        path.write_text("content\n")

        direct = result_of(await run_one(CommandStage("cat", [Path("/bin/cat"), path])), "cat")
        shell = result_of(await run_one(CommandStage("cat", ["cat", path], shell=True)), "cat")

        assert direct.stdout == shell.stdout == "content\n"
        assert shell.args == ("/bin/sh", "-c", shlex.join(["cat", str(path)]))

    async def test_other_success_codes(self) -> None:
        """``success_codes=(0, 3)`` makes exit status 3 a success, returned as such."""
        result = result_of(await run_one(CommandStage("grep", ["sh", "-c", "exit 3"], success_codes=(0, 3))), "grep")

        assert result.returncode == 3

    async def test_other_stages_can_run_commands(self) -> None:
        """``CommandStage.run(ctx, command)`` runs another command with the stage's settings."""
        tools = CommandStage("tools", ["true"], env={"GREETING": "hi"})

        @pk.stage
        async def both(ctx: pk.StageContext) -> list[str]:
            first = await tools.run(ctx, ["sh", "-c", "echo $GREETING ${WHO}"])
            second = await tools.run(ctx, "echo second")
            return [first.stdout, second.stdout]

        response = await pk.Pipeline("ci").add_stage(both).execute(input={"WHO": "you"})

        assert response.outputs["both"] == ["hi you\n", "second\n"]


class TestFailure:
    """Failures say what failed and why, as the cause of the run's StageFailedError."""

    async def test_a_failing_command_names_its_status_and_stderr(self) -> None:
        """The run's error names CommandFailedError and the last stderr line; the cause carries the details."""
        code = "import sys; print('compiling'); print('warning: x', file=sys.stderr); sys.exit('error: disk full')"

        response = await run_one(CommandStage("build", py(code)))

        assert response.status is pk.Status.FAILED
        message = str(response.error)
        assert message.startswith("stage 'build' failed after 1 attempt: CommandFailedError: command ")
        assert message.endswith("exited with status 1; stderr ends with: error: disk full")
        cause = cause_of(response)
        assert isinstance(cause, CommandFailedError)
        assert cause.returncode == 1
        assert cause.stderr == "warning: x\nerror: disk full\n"
        assert cause.command == (PY, "-c", py(code)[2])
        assert response.stages["build"].error is cause

    async def test_a_failing_script_is_shown_by_its_first_line(self) -> None:
        """A multi-line shell script appears in the message as its first line, not the whole script."""
        script = "echo checking\nif [ -n 'x' ]; then echo 'not approved' >&2; exit 3; fi\necho unreachable\n"

        response = await run_one(CommandStage("verify", script, shell=True))

        cause = cause_of(response)
        assert isinstance(cause, CommandFailedError)
        assert str(cause) == "command 'echo checking ...' exited with status 3; stderr ends with: not approved"
        assert cause.command == ("/bin/sh", "-c", script)  # the whole script stays on the error

    async def test_a_missing_executable(self) -> None:
        """An executable not on PATH: a CommandNotFoundError naming it."""
        response = await run_one(CommandStage("lint", "no-such-tool-pipekit --fix"))

        cause = cause_of(response)
        assert isinstance(cause, CommandNotFoundError)
        assert isinstance(cause, FileNotFoundError)
        assert str(cause) == "executable 'no-such-tool-pipekit' not found on PATH"
        assert cause.command == ("no-such-tool-pipekit", "--fix")
        assert str(response.error).endswith("CommandNotFoundError: executable 'no-such-tool-pipekit' not found on PATH")

    async def test_a_missing_executable_path(self, tmp_path: Path) -> None:
        """A relative path is looked up in the working directory."""
        response = await run_one(CommandStage("build", "./build.sh", cwd=tmp_path))

        cause = cause_of(response)
        assert isinstance(cause, CommandNotFoundError)
        assert str(cause) == "executable './build.sh' does not exist"

    async def test_a_file_that_is_not_executable(self, tmp_path: Path) -> None:
        """A file without the execute permission: a CommandNotFoundError saying so."""
        script = tmp_path / "build.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o644)  # no execute bit for anyone: not even root may execute it

        cause = cause_of(await run_one(CommandStage("build", [script])))

        assert isinstance(cause, CommandNotFoundError)
        assert str(cause) == f"{str(script)!r} is not executable (Permission denied)"

    async def test_a_script_whose_interpreter_is_missing(self, tmp_path: Path) -> None:
        """A script whose ``#!`` line names a missing interpreter: a CommandNotFoundError saying so."""
        script = tmp_path / "build.sh"
        script.write_text("#!/no/such/interpreter\necho hi\n")
        script.chmod(0o755)

        cause = cause_of(await run_one(CommandStage("build", [script])))

        assert isinstance(cause, CommandNotFoundError)
        assert str(cause) == f"{str(script)!r} could not be started: the interpreter its #! line names does not exist"

    async def test_a_file_that_is_not_a_program(self, tmp_path: Path) -> None:
        """An executable file the system cannot run (no ``#!``, not a binary): a one-line CommandNotFoundError."""
        program = tmp_path / "build"
        program.write_bytes(b"\x00\x01\x02 not a program")
        program.chmod(0o755)

        cause = cause_of(await run_one(CommandStage("build", [program])))

        assert isinstance(cause, CommandNotFoundError)
        assert str(cause) == f"{str(program)!r} could not be started: Exec format error"

    async def test_a_missing_working_directory(self, tmp_path: Path) -> None:
        """A ``cwd`` that does not exist: a CommandError naming it."""
        missing = tmp_path / "nope"

        cause = cause_of(await run_one(CommandStage("build", ["true"], cwd=missing)))

        assert type(cause) is CommandError
        assert str(cause) == f"working directory {str(missing)!r} does not exist"

    async def test_errors_are_pipekit_errors(self) -> None:
        """The command errors belong to the pipekit family."""
        assert issubclass(CommandFailedError, CommandError)
        assert issubclass(CommandNotFoundError, CommandError)
        assert issubclass(CommandError, pk.PipekitError)


class TestDefinition:
    """Invalid constructor arguments fail at once with one line naming the problem."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"command": ""}, "stage 'build': command is empty"),
            ({"command": "   "}, "stage 'build': command is empty"),
            ({"command": []}, "stage 'build': command is empty"),
            ({"command": [""]}, "stage 'build': command is empty"),
            ({"command": 42}, "stage 'build': command must be a string or a list of strings, got int"),
            ({"command": ["make", 1]}, "stage 'build': command must be a string or a list of strings, got list"),
            (
                {"command": "echo 'oops"},
                "stage 'build': cannot split command \"echo 'oops\": No closing quotation",
            ),
            ({"rollback_command": ""}, "stage 'build': rollback_command is empty"),
            ({"success_codes": 0}, "stage 'build': success_codes must be a list of integers"),
            ({"success_codes": ["0"]}, "stage 'build': success_codes must be a list of integers"),
            ({"success_codes": (True,)}, "stage 'build': success_codes must be a list of integers"),
            ({"success_codes": []}, "stage 'build': success_codes is empty (no exit status would succeed)"),
            ({"env": {"PORT": 8080}}, "stage 'build': env['PORT'] must be a string or pipekit.ci.Secret, got int"),
            ({"env": {"": "x"}}, "stage 'build': invalid environment variable name ''"),
            ({"env": {"A=B": "x"}}, "stage 'build': invalid environment variable name 'A=B'"),
            ({"env": ["PATH"]}, "stage 'build': env must be a mapping, got list"),
            ({"timeout": 0}, "stage 'build': timeout must be a number of seconds > 0, got 0"),
            ({"timeout": -1.5}, "stage 'build': timeout must be a number of seconds > 0, got -1.5"),
            ({"timeout": "10"}, "stage 'build': timeout must be a number of seconds > 0, got '10'"),
            ({"timeout": float("nan")}, "stage 'build': timeout must be a number of seconds > 0, got nan"),
            ({"kill_grace": 0}, "stage 'build': kill_grace must be a number of seconds > 0, got 0"),
            ({"tail_bytes": 0}, "stage 'build': tail_bytes must be an integer >= 1, got 0"),
            ({"retry": 3}, "stage 'build': retry must be a pipekit.RetryPolicy, got 3"),
        ],
    )
    def test_invalid_arguments(self, kwargs: dict[str, Any], message: str) -> None:
        """Each invalid option raises PipelineDefinitionError with this message."""
        options = {"command": "make", **kwargs}
        with pytest.raises(pk.PipelineDefinitionError) as info:
            CommandStage("build", **options)

        assert str(info.value) == message
        assert "\n" not in str(info.value)

    def test_an_empty_name(self) -> None:
        """A stage needs a name."""
        with pytest.raises(pk.PipelineDefinitionError, match="non-empty string name"):
            CommandStage("", "make")

    def test_options_are_kept(self) -> None:
        """The constructor keeps what it was given, normalised."""
        stage = CommandStage("build", "make -j4", timeout=10, success_codes=[0, 2], description="compile")

        assert stage.command == ("make", "-j4")
        assert stage.timeout == 10.0
        assert stage.success_codes == frozenset({0, 2})
        assert stage.description == "compile"
        assert repr(stage) == "<CommandStage 'build': 'make -j4'>"


class TestRetryAndTimeout:
    """Stage policies apply to commands: a flaky command is retried, a slow one timed out."""

    async def test_a_flaky_command_succeeds_on_its_third_attempt(self, tmp_path: Path) -> None:
        """Two failures, then success; each retry is an event, each attempt's output tagged with its number."""
        stage = CommandStage("fetch", flaky(tmp_path / "count", failures=2), retry=NO_WAIT)

        with capture_events() as events:
            response = await run_one(stage)

        result = result_of(response, "fetch")
        assert result.stdout == "attempt 3\n"
        assert response.stages["fetch"].attempts == 3
        retries = events.of(pk.StageRetrying)
        assert [(e.attempt, e.delay) for e in retries] == [(1, 0), (2, 0)]
        assert [type(e.error) for e in retries] == [CommandFailedError, CommandFailedError]
        stdout = [(e.attempt, e.line) for e in events.of(OutputLine) if e.stream == "stdout"]
        assert stdout == [(1, "attempt 1"), (2, "attempt 2"), (3, "attempt 3")]

    async def test_add_stage_picks_up_the_stages_retry_policy(self, tmp_path: Path) -> None:
        """The stage's own ``retry`` applies; ``add_stage(retry=...)`` overrides it."""
        own = CommandStage("fetch", flaky(tmp_path / "a", failures=3), retry=NO_WAIT)
        overridden = CommandStage("fetch", flaky(tmp_path / "b", failures=3), retry=NO_WAIT)
        five = pk.RetryPolicy(max_attempts=5, initial_delay=0, jitter=0)

        gives_up = await pk.Pipeline("ci").add_stage(own).execute()
        succeeds = await pk.Pipeline("ci").add_stage(overridden, retry=five).execute()

        assert gives_up.status is pk.Status.FAILED
        assert gives_up.stages["fetch"].attempts == 3
        assert str(gives_up.error).endswith("stderr ends with: flaky failure 3")
        assert succeeds.ok
        assert succeeds.stages["fetch"].attempts == 4

    async def test_the_stages_timeout_applies(self) -> None:
        """``timeout=`` limits each attempt."""
        stage = CommandStage("slow", ["sleep", "30"], timeout=0.2)

        response = await run_one(stage)

        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.error.timeout == 0.2

    async def test_add_stage_timeout_overrides_the_stages(self) -> None:
        """``add_stage(timeout=...)`` wins over the stage's own timeout."""
        stage = CommandStage("slow", ["sleep", "30"], timeout=60)

        response = await pk.Pipeline("ci").add_stage(stage, timeout=0.2).execute()

        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.error.timeout == 0.2


class TestRollback:
    """``rollback_command`` undoes a stage when a later one fails."""

    async def test_the_rollback_command_runs_after_a_later_failure(self, tmp_path: Path) -> None:
        """It runs with the stage's settings and variables; stages without one are not rolled back."""
        deploy = CommandStage(
            "deploy",
            ["sh", "-c", "echo ${VERSION} > deployed"],
            cwd=tmp_path,
            rollback_command=["sh", "-c", "rm deployed && echo undid ${VERSION} && echo undid ${VERSION} > undone"],
        )
        pipeline = (
            pk.Pipeline("release")
            .add_stage(CommandStage("build", ["true"]))
            .add_stage(deploy)
            .add_stage(CommandStage("smoke", ["sh", "-c", "echo unhealthy >&2; exit 1"]))
        )

        with capture_events() as events:
            response = await pipeline.execute(input={"VERSION": "1.4.2"})

        assert response.status is pk.Status.FAILED
        assert str(response.error).endswith("stderr ends with: unhealthy")
        assert (tmp_path / "undone").read_text() == "undid 1.4.2\n"
        assert not (tmp_path / "deployed").exists()
        assert response.stages["deploy"].rolled_back
        assert not response.stages["build"].rolled_back
        assert [e.stage for e in events.of(pk.StageRolledBack)] == ["deploy"]
        assert ("deploy", "undid 1.4.2") in [(e.stage, e.line) for e in events.of(OutputLine)]

    async def test_a_failing_rollback_command_is_reported(self, tmp_path: Path) -> None:
        """A failing rollback command: StageRollbackFailed, and a RollbackError beside the original error."""
        deploy = CommandStage(
            "deploy", ["true"], rollback_command=["sh", "-c", "echo cannot undo >&2; exit 4"], cwd=tmp_path
        )
        pipeline = pk.Pipeline("release").add_stage(deploy).add_stage(CommandStage("smoke", ["false"]))

        with capture_events() as events:
            response = await pipeline.execute()

        assert isinstance(response.error, pk.StageFailedError)
        assert response.error.stage == "smoke"
        assert isinstance(response.error.rollback_error, pk.RollbackError)
        error = response.stages["deploy"].rollback_error
        assert isinstance(error, CommandFailedError)
        assert (error.returncode, error.stderr) == (4, "cannot undo\n")
        assert not response.stages["deploy"].rolled_back
        assert [e.stage for e in events.of(pk.StageRollbackFailed)] == ["deploy"]

    @pytest.mark.parametrize("how", ["timeout", "cancel"])
    async def test_the_rollback_command_runs_when_a_later_stage_is_interrupted(self, tmp_path: Path, how: str) -> None:
        """A later stage timing out, or the caller cancelling the run: the rollback command still runs, shielded."""
        deploy = CommandStage("deploy", "touch deployed", cwd=tmp_path, rollback_command="rm deployed")
        hang = CommandStage("smoke", "echo checking; sleep 30", shell=True, timeout=0.5 if how == "timeout" else None)
        pipeline = pk.Pipeline("release").add_stage(deploy).add_stage(hang)
        scope = anyio.CancelScope()

        async def cancel_when_smoke_prints(event: pk.Event) -> None:
            if how == "cancel" and isinstance(event, OutputLine) and event.stage == "smoke":
                scope.cancel()

        with capture_events() as events, scope:
            response = await pipeline.execute(hooks=[cancel_when_smoke_prints])

        if how == "timeout":
            assert response.status is pk.Status.TIMED_OUT
        else:
            assert scope.cancelled_caught
        assert not (tmp_path / "deployed").exists()
        assert [e.stage for e in events.of(pk.StageRolledBack)] == ["deploy"]


class TestSecrets:
    """Secret values are masked everywhere pipekit shows text."""

    def test_secret_hides_its_value(self) -> None:
        """``str()`` and ``repr()`` never show the value; ``reveal()`` does."""
        secret = Secret("s3cr3t-value")

        assert str(secret) == "***"
        assert repr(secret) == "Secret('***')"
        assert f"{secret}" == "***"
        assert secret.reveal() == "s3cr3t-value"
        assert secret == Secret("s3cr3t-value")

    async def test_secrets_never_appear(self, tmp_path: Path) -> None:
        """Env, variable and input secrets: masked in events, logs, results, errors, spans and the log file."""
        secrets = {"TOKEN": "tok-s3cr3t", "API_KEY": "key-s3cr3t", "PASSWORD": "pw-s3cr3t"}
        code = """
            import os, sys
            print("env", os.environ["TOKEN"], "key", sys.argv[1], "password", sys.argv[2])
            print("failing with", os.environ["TOKEN"], file=sys.stderr)
            sys.exit(int(sys.argv[3]))
        """
        log_file = tmp_path / "deploy.log"
        stage = CommandStage(
            "deploy",
            py(code, "${API_KEY}", "--password=${PASSWORD}", "${STATUS}"),
            env={"TOKEN": Secret(secrets["TOKEN"])},
            log_file=log_file,
        )
        pipeline = pk.Pipeline("ci").add_stage(stage).with_variables(API_KEY=Secret(secrets["API_KEY"]))

        with capture_spans() as spans, capture_events() as events, structlog.testing.capture_logs() as logs:
            ok = await pipeline.execute(input={"PASSWORD": Secret(secrets["PASSWORD"]), "STATUS": 0})
            failed = await pipeline.execute(input={"PASSWORD": Secret(secrets["PASSWORD"]), "STATUS": 1})

        result = result_of(ok, "deploy")
        assert result.args == (PY, "-c", py(code)[2], "***", "--password=***", "0")
        assert result.stdout == "env *** key *** password --password=***\n"
        assert result.stderr == "failing with ***\n"
        cause = cause_of(failed)
        assert isinstance(cause, CommandFailedError)
        assert cause.stderr == "failing with ***\n"
        assert str(cause).endswith("stderr ends with: failing with ***")
        lines = sorted(e.line for e in events.of(OutputLine))
        assert lines == ["env *** key *** password --password=***"] * 2 + ["failing with ***"] * 2
        stage_spans = sorted(
            (span for span in spans.spans if span.name == "stage deploy"), key=lambda s: s.start_time or 0
        )
        assert [(span.attributes or {}).get("pipekit.ci.command") for span in stage_spans] == [
            shlex.join(result.args),
            shlex.join(cause.command),
        ]
        shown = [
            repr(ok),
            repr(failed),
            str(failed.error),
            repr(cause.command),
            repr(events.events),
            repr(logs),
            *(repr(dict(span.attributes or {})) for span in spans.spans),
            *(repr(dict(event.attributes or {})) for span in spans.spans for event in span.events),
            log_file.read_text(encoding="utf-8"),
        ]
        for value in secrets.values():
            assert not [text for text in shown if value in text], f"{value!r} leaked"
        assert "env *** key ***" in log_file.read_text(encoding="utf-8")

    async def test_a_secret_in_a_missing_working_directory_is_masked(self, tmp_path: Path) -> None:
        """The error naming a ``cwd`` that does not exist masks the secret it references."""
        stage = CommandStage("build", ["true"], cwd=f"{tmp_path}/${{TOKEN}}")

        cause = cause_of(await run_one(stage, input={"TOKEN": Secret("tok-s3cr3t")}))

        assert type(cause) is CommandError
        assert str(cause) == f"working directory '{tmp_path}/***' does not exist"

    async def test_each_line_of_a_multiline_secret_is_masked(self) -> None:
        """Output is masked line by line: every line of a multi-line secret is masked (not short ones like ``{``)."""
        key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkq\n{\n-----END KEY-----"
        stage = CommandStage("show", ["printf", "%s\\n", "${KEY}"])

        with capture_events() as events:
            result = result_of(await run_one(stage, input={"KEY": Secret(key)}), "show")

        assert result.stdout == "***\n***\n{\n***\n"
        assert [e.line for e in events.of(OutputLine)] == ["***", "***", "{", "***"]


class TestTemplates:
    """``${NAME}`` expansion from variables and input; ``$$`` is a ``$``."""

    async def test_variables_and_input_input_wins(self) -> None:
        """Both are looked up; the request input wins over a variable of the same name."""
        stage = CommandStage("show", py(ARGV, "${TARGET}", "${MODE}", "${TARGET}-${MODE}.tar"))

        response = await run_one(stage, variables={"TARGET": "linux", "MODE": "debug"}, input={"MODE": "release"})

        assert json.loads(result_of(response, "show").stdout) == ["linux", "release", "linux-release.tar"]

    async def test_dollar_escapes(self) -> None:
        """``$$`` is a literal ``$``; a ``$`` not starting a reference stays as it is."""
        stage = CommandStage("show", py(ARGV, "$${HOME}", "$$", "a$b", "$HOME", "cost: 5$"))

        result = result_of(await run_one(stage), "show")

        assert json.loads(result.stdout) == ["${HOME}", "$", "a$b", "$HOME", "cost: 5$"]

    async def test_values_that_are_not_strings(self) -> None:
        """Numbers become their text, booleans ``true``/``false``, None the empty string."""
        stage = CommandStage("show", py(ARGV, "${N}", "${X}", "${YES}", "${NO}", "${NOTHING}"))

        response = await run_one(stage, variables={"N": 3, "X": 1.5, "YES": True, "NO": False, "NOTHING": None})

        assert json.loads(result_of(response, "show").stdout) == ["3", "1.5", "true", "false", ""]

    async def test_a_value_stays_one_argument(self, tmp_path: Path) -> None:
        """Spaces and shell syntax in a value stay inside one argument, in list and string commands."""
        value = "a b; touch pwned $(touch pwned2) `touch pwned3` *"
        listed = CommandStage("listed", py(ARGV, "${V}", "--name=${V}"), cwd=tmp_path)
        split = CommandStage("split", f"{shlex.quote(PY)} -c {shlex.quote(ARGV)} ${{V}}", cwd=tmp_path)

        first = await run_one(listed, input={"V": value})
        second = await run_one(split, input={"V": value})

        assert json.loads(result_of(first, "listed").stdout) == [value, f"--name={value}"]
        assert json.loads(result_of(second, "split").stdout) == [value]
        assert [p async for p in anyio.Path(tmp_path).iterdir()] == []

    async def test_shell_commands_get_values_quoted(self, tmp_path: Path) -> None:
        """With ``shell=True`` each value is quoted: ``; touch pwned`` is printed, not run."""
        value = "x; touch pwned && echo $(touch pwned2) `touch pwned3` 'q\" *"
        stage = CommandStage("echo", "printf '%s\\n' ${V} && printf '%s\\n' pre-${V}-post", shell=True, cwd=tmp_path)

        result = result_of(await run_one(stage, input={"V": value}), "echo")

        assert result.stdout == f"{value}\npre-{value}-post\n"
        assert [p async for p in anyio.Path(tmp_path).iterdir()] == []

    @pytest.mark.parametrize(
        ("script", "printed"),
        [
            ('printf "[%s]\\n" "${V}"', "[{}]"),
            ("printf '[%s]\\n' '${V}'", "[{}]"),
            ('printf "%s\\n" "pre ${V} post"', "pre {} post"),
            ("printf '%s\\n' 'pre ${V} post'", "pre {} post"),
            ("printf '%s\\n' \"$$(printf '%s' ${V})\"", "{}"),
            ("printf '%s\\n' \"`printf '%s' ${V}`\"", "{}"),
            ("# it's a comment\nprintf '%s\\n' ${V}", "{}"),
            ("printf '%s\\n' \\' ${V}", "'\n{}"),
        ],
    )
    async def test_quoted_shell_references_stay_data(self, tmp_path: Path, script: str, printed: str) -> None:
        """In quotes, in ``$(...)``, after a comment: a value is never parsed by the shell, quotes and all."""
        hostile = "x'; touch pwned1; ' \"; touch pwned2; \" $(touch pwned3) `touch pwned4` *"
        stage = CommandStage("echo", script, shell=True, cwd=tmp_path)

        result = result_of(await run_one(stage, input={"V": hostile}), "echo")

        assert result.stdout == printed.format(hostile) + "\n"
        assert [p async for p in anyio.Path(tmp_path).iterdir()] == []

    async def test_shell_scripts_read_values_from_the_environment(self) -> None:
        """The script that runs names the values' environment variables: a secret is in neither args nor ps."""
        stage = CommandStage("login", "echo user ${USER_NAME} > /dev/null && test \"$$1\" = '${PASSWORD}'", shell=True)

        # A quote in a secret once leaked it: quoting changed its text, so masking missed it.
        response = await run_one(stage, input={"USER_NAME": "ci", "PASSWORD": Secret("pw-'s3cr3t")})

        assert response.status is pk.Status.FAILED  # $1 is not the password: the test failed
        assert "s3cr3t" not in repr(response)
        cause = cause_of(response)
        assert isinstance(cause, CommandFailedError)
        assert cause.command == (
            "/bin/sh",
            "-c",
            'echo user "${PIPEKIT_VAR_USER_NAME}" > /dev/null && test "$1" = \'\'"${PIPEKIT_VAR_PASSWORD}"\'\'',
        )
        printenv = CommandStage("env", "printenv PIPEKIT_VAR_USER_NAME; echo ${USER_NAME}", shell=True)
        assert result_of(await run_one(printenv, input={"USER_NAME": "ci"}), "env").stdout == "ci\nci\n"

    async def test_references_in_cwd_and_env(self, tmp_path: Path) -> None:
        """``cwd`` and ``env`` values are expanded too."""
        (tmp_path / "work").mkdir()
        stage = CommandStage(
            "where",
            py("import os; print(os.getcwd(), os.environ['GREETING'])"),
            cwd="${ROOT}/work",
            env={"GREETING": "hello ${WHO}"},
        )

        response = await run_one(stage, variables={"ROOT": str(tmp_path)}, input={"WHO": "world"})

        assert result_of(response, "where").stdout == f"{await anyio.Path(tmp_path, 'work').resolve()} hello world\n"

    async def test_an_unknown_reference_fails_before_running(self, tmp_path: Path) -> None:
        """A real run fails validation: the command never starts."""
        stage = CommandStage("build", ["sh", "-c", "touch ran; echo ${NOPE}"], cwd=tmp_path)

        response = await run_one(stage)

        assert response.status is pk.Status.FAILED
        cause = cause_of(response)
        assert isinstance(cause, pk.ValidationError)
        assert str(cause) == "stage 'build': command: unknown variable ${NOPE}"
        assert not (tmp_path / "ran").exists()

    async def test_an_unknown_reference_in_a_dry_run(self, tmp_path: Path) -> None:
        """A dry run reports it, and runs nothing."""
        stage = CommandStage("build", ["sh", "-c", "touch ran; echo ${NOPE}"], cwd=tmp_path)

        response = await pk.Pipeline("ci").add_stage(stage).execute(pk.PipelineRequest(options=DRY_RUN))

        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == ["stage 'build': command: unknown variable ${NOPE}"]
        assert not (tmp_path / "ran").exists()

    @pytest.mark.parametrize("reference", ["${}", "${1X}", "${A-B}", "${A B}"])
    async def test_an_invalid_reference(self, reference: str) -> None:
        """A reference that is not an identifier is a validation error."""
        response = await run_one(CommandStage("build", ["echo", f"x{reference}"]))

        cause = cause_of(response)
        assert isinstance(cause, pk.ValidationError)
        assert str(cause) == f"stage 'build': command: {reference} is not a valid reference"

    async def test_run_reports_an_unknown_reference(self) -> None:
        """``CommandStage.run`` with a command of unknown references raises CommandError (not validated)."""
        tools = CommandStage("tools", ["true"])

        @pk.stage
        async def adhoc(ctx: pk.StageContext) -> None:
            await tools.run(ctx, "echo ${MISSING}")

        response = await pk.Pipeline("ci").add_stage(adhoc).execute()

        cause = cause_of(response)
        assert type(cause) is CommandError
        assert str(cause) == "unknown variable ${MISSING} in command"


class TestDryRun:
    """A dry run lists every missing executable and unknown name at once, and runs nothing."""

    async def test_every_problem_of_every_stage_at_once(self, tmp_path: Path) -> None:
        """Stages' references and executables, and the pipeline's validators: one error listing all."""
        pipeline = (
            pk.Pipeline("release")
            .add_stage(CommandStage("lint", "no-such-linter-pipekit --fix ${TARGET}"))
            .add_stage(CommandStage("test", py("pass"), env={"DB": "${DB_URL}"}, cwd="${WORKSPACE}"))
            .add_stage(CommandStage("deploy", "kubectl-pipekit apply", rollback_command="helm-pipekit rollback"))
            .add_stage(CommandStage("notify", ["sh", "-c", "echo ${CHANNEL}"], shell=True))
            .add_stage(CommandStage("clean", ["sh", "-c", "touch ran"], cwd=tmp_path))
            .with_variables(WORKSPACE=str(tmp_path))
            .with_validators(
                EnvVarValidator(["DEPLOY_TOKEN"], env={}),
                ToolValidator(["docker-pipekit"], path=str(tmp_path)),
            )
        )

        response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))

        assert isinstance(response.error, pk.ValidationError)
        assert sorted(str(e) for e in response.error.errors) == sorted(
            [
                "environment variable 'DEPLOY_TOKEN' is not set",
                "tool 'docker-pipekit' is not on PATH",
                "stage 'lint': command: unknown variable ${TARGET}",
                "stage 'lint': command: executable 'no-such-linter-pipekit' not found on PATH",
                "stage 'test': env['DB']: unknown variable ${DB_URL}",
                "stage 'deploy': command: executable 'kubectl-pipekit' not found on PATH",
                "stage 'deploy': rollback_command: executable 'helm-pipekit' not found on PATH",
                "stage 'notify': command: unknown variable ${CHANNEL}",
            ]
        )
        failed, skipped = pk.Status.FAILED, pk.Status.SKIPPED
        statuses = {name: result.status for name, result in response.stages.items()}
        assert statuses == {"lint": failed, "test": failed, "deploy": failed, "notify": failed, "clean": skipped}
        assert not (tmp_path / "ran").exists()

    async def test_executables_are_looked_up_on_the_commands_path(self, tmp_path: Path) -> None:
        """A tool on the stage's own ``PATH`` (even through a reference) is found; a missing one is not."""
        tool = tmp_path / "mytool"
        tool.write_text("#!/bin/sh\necho from mytool\n")
        tool.chmod(0o755)
        found = CommandStage("found", "mytool", env={"PATH": "${BIN}"})
        missing = CommandStage("missing", "mytool")
        pipeline = pk.Pipeline("ci").add_stage(found).add_stage(missing).with_variables(BIN=str(tmp_path))

        response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))

        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "stage 'missing': command: executable 'mytool' not found on PATH"
        ]

    async def test_a_clean_dry_run_runs_nothing(self, tmp_path: Path) -> None:
        """Everything present: the dry run succeeds, and no command ran."""
        stage = CommandStage("build", py("open('ran', 'w')"), cwd=tmp_path)

        response = await pk.Pipeline("ci").add_stage(stage).execute(pk.PipelineRequest(options=DRY_RUN))

        assert response.ok
        assert response.stages["build"].status is pk.Status.SKIPPED
        assert not (tmp_path / "ran").exists()


class TestEnvironment:
    """The environment and working directory a command gets."""

    async def test_inherit_env_false_gives_only_env(self) -> None:
        """Without inheriting, the command sees exactly ``env``."""
        stage = CommandStage("env", ["env"], env={"ONLY": "1", "TOKEN": Secret("t")}, inherit_env=False)

        result = result_of(await run_one(stage), "env")

        assert sorted(result.stdout.splitlines()) == ["ONLY=1", "TOKEN=***"]

    async def test_the_environment_is_inherited_and_extended(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """By default the current environment is passed on, ``env`` entries overriding it."""
        monkeypatch.setenv("PIPEKIT_TEST_INHERITED", "yes")
        monkeypatch.setenv("PIPEKIT_TEST_OVERRIDDEN", "old")
        code = "import os; print(os.environ['PIPEKIT_TEST_INHERITED'], os.environ['PIPEKIT_TEST_OVERRIDDEN'])"
        stage = CommandStage("env", py(code), env={"PIPEKIT_TEST_OVERRIDDEN": "new"})

        assert result_of(await run_one(stage), "env").stdout == "yes new\n"

    async def test_cwd_is_honoured(self, tmp_path: Path) -> None:
        """The command runs in ``cwd``, where a relative executable is found."""
        script = tmp_path / "build.sh"
        script.write_text('#!/bin/sh\necho "built in $(pwd -P)"\n')
        script.chmod(0o755)

        result = result_of(await run_one(CommandStage("build", "./build.sh", cwd=tmp_path)), "build")

        assert result.stdout == f"built in {await anyio.Path(tmp_path).resolve()}\n"

    async def test_a_relative_cwd_and_a_relative_executable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``./build.sh`` with ``cwd="sub"`` runs ``sub/build.sh`` (the path is not resolved twice)."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "sub").mkdir()
        script = tmp_path / "sub" / "build.sh"
        script.write_text("#!/bin/sh\necho built\n")
        script.chmod(0o755)

        result = result_of(await run_one(CommandStage("build", "./build.sh", cwd="sub")), "build")

        assert result.stdout == "built\n"

    async def test_a_relative_path_entry(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A tool found through a relative ``PATH`` entry runs even when the command's cwd is elsewhere."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "bin").mkdir()
        (tmp_path / "elsewhere").mkdir()
        tool = tmp_path / "bin" / "pipekit-test-tool"
        tool.write_text("#!/bin/sh\necho tool ran\n")
        tool.chmod(0o755)
        stage = CommandStage("tool", ["pipekit-test-tool"], cwd="elsewhere", env={"PATH": f"bin{os.pathsep}/bin"})

        assert result_of(await run_one(stage), "tool").stdout == "tool ran\n"

    async def test_stdin_is_not_the_callers(self) -> None:
        """A command reading its standard input gets end-of-file (it reads ``/dev/null``) instead of hanging."""
        code = "import os, sys; sys.stdin.read(); print(os.path.samestat(os.fstat(0), os.stat(os.devnull)))"

        result = result_of(await run_one(CommandStage("read", py(code), timeout=10)), "read")

        assert result.stdout == "True\n"

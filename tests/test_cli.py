"""Tests for the ``pipekit`` command: run, validate, runs, show, stats, retry, schema, version.

Commands run in-process through Typer's `CliRunner` (stdout is not a terminal
there, so the output is the plain, line-per-event kind), on real pipeline
files in ``tmp_path`` whose stages run real ``sh -c`` / ``python -c``
commands, recording into a real SQLite database in ``tmp_path``. The Ctrl-C
test runs the command in a subprocess and sends it SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.abc
import pytest
import structlog
from typer.testing import CliRunner, Result

import pipekit as pk
from pipekit.cli import _app
from pipekit.cli._app import RunState, app
from pipekit.store import RUN_STATUSES, SqliteStore
from tests.helpers import signal_cli

PYTHON = sys.executable


def q(text: str) -> str:
    """``text`` as a YAML double-quoted string."""
    return json.dumps(text)


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run ``pipekit ARGS`` in-process and return its result (stdout and stderr apart)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def error_lines(result: Result) -> list[str]:
    return result.stderr.splitlines()


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> None:
    """The command failed with ``exit_code`` and one ``pipekit: error:`` line containing every fragment."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("pipekit: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


_connect = sqlite3.connect


def read_only_connect(path: str, **kwargs: Any) -> sqlite3.Connection:
    """`sqlite3.connect` as SQLite opens a file it may not write (no write permission): read-only."""
    connection: sqlite3.Connection = _connect(f"file:{path}?mode=ro", uri=True, **kwargs)
    return connection


def run_count(db: Path) -> int:
    """How many runs ``db`` holds, read with plain sqlite3 (whatever its schema version says)."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])


def runs_json(db: Path, *args: str) -> list[dict[str, Any]]:
    result = invoke("runs", "--db", db, "--json", *args)
    assert result.exit_code == 0, result.output
    runs: list[dict[str, Any]] = json.loads(result.stdout)["runs"]
    return runs


def show_json(db: Path, run_id: str) -> dict[str, Any]:
    result = invoke("show", run_id, "--db", db, "--json")
    assert result.exit_code == 0, result.output
    record: dict[str, Any] = json.loads(result.stdout)
    return record


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own (for relative paths and module:attribute imports)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def db(project: Path) -> Path:
    return project / "history" / "pipekit.db"


@pytest.fixture
def hello(project: Path) -> Path:
    """A pipeline that succeeds: ``build`` prints, ``test`` prints to stdout and stderr."""
    return write(
        project / "hello.yaml",
        f"""
        name: hello
        stages:
          - name: build
            command: [{q(PYTHON)}, "-c", "print('built it')"]
          - name: test
            shell: true
            command: echo testing; echo careful >&2
        """,
    )


@pytest.fixture
def failing(project: Path) -> Path:
    """A pipeline whose second stage fails; the first one's rollback leaves ``undone``."""
    return write(
        project / "failing.yaml",
        """
        name: failing
        stages:
          - name: prepare
            shell: true
            command: echo prepared
            rollback: touch undone
          - name: broken
            shell: true
            command: echo something broke >&2; exit 3
          - name: never
            shell: true
            command: touch never-ran
        """,
    )


@pytest.fixture
def flaky(project: Path) -> Path:
    """``count`` appends to ``count.log`` each time it runs; ``check`` fails until ``marker`` exists (it makes it)."""
    return write(
        project / "flaky.yaml",
        """
        name: flaky
        stages:
          - name: count
            shell: true
            command: echo ran >> count.log
          - name: check
            shell: true
            command: test -f marker || { touch marker; echo first time fails; exit 1; }
        """,
    )


class TestRun:
    def test_success_exits_0_with_plain_progress_and_a_summary(self, hello: Path, db: Path) -> None:
        """A run that succeeds exits 0; off a terminal it prints one plain line per event, then a summary."""
        result = invoke("run", hello, "--db", db)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "\x1b[" not in out
        lines = out.splitlines()
        assert lines[0] == "[hello] started"
        assert "[hello] build | built it" in lines
        assert "[hello] test | testing" in lines
        assert "[hello] test ! careful" in lines
        assert "pipeline 'hello' succeeded in " in out
        (run,) = runs_json(db)
        assert f"run {run['id']} recorded in {db}" in lines
        assert run["status"] == "succeeded"
        assert run["trigger"] == "cli"
        assert result.stderr == ""

    def test_live_display_on_a_terminal(self, failing: Path) -> None:
        """On a terminal, the stages are drawn as a live table in colour, then a summary table; --plain opts out."""
        terminal = {"TTY_COMPATIBLE": "1", "COLUMNS": "120"}
        result = invoke("run", failing, "--no-db", env=terminal)
        assert result.exit_code == 1
        assert "\x1b[" in result.stdout
        assert "[failing] started" not in result.stdout
        assert "\x1b[1;36mfailing" in result.stdout  # the live table's title
        assert "╭" in result.stdout  # the summary table
        assert "↺ rolled back" in result.stdout
        result = invoke("run", failing, "--no-db", "--plain", env=terminal)
        assert "\x1b[" not in result.stdout
        assert "[failing] started" in result.stdout

    def test_failure_exits_1_after_rolling_back(self, failing: Path, db: Path, project: Path) -> None:
        """A failed run exits 1, rolls back what completed, skips the rest, and says so in the summary."""
        result = invoke("run", failing, "--db", db)
        assert result.exit_code == 1
        assert (project / "undone").exists()
        assert not (project / "never-ran").exists()
        out = result.stdout
        assert "[failing] broken ! something broke" in out
        assert "pipeline 'failing' FAILED in " in out
        summary = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
        assert "rolled back" in summary["prepare"]
        assert "exited with status 3" in summary["broken"]
        assert "skipped" in summary["never"]
        assert out.splitlines()[-2].startswith("error: StageFailedError: stage 'broken' failed")
        (run,) = runs_json(db)
        assert run["status"] == "failed"

    def test_json_document_on_success(self, hello: Path, db: Path) -> None:
        """--json prints only one JSON document: run id, pipeline, status, duration, error, stages."""
        result = invoke("run", hello, "--db", db, "--json")
        assert result.exit_code == 0
        document = json.loads(result.stdout)
        (run,) = runs_json(db)
        assert document["run_id"] == run["id"]
        assert document["pipeline"] == "hello"
        assert document["status"] == "succeeded"
        assert document["ok"] is True
        assert document["error"] is None
        assert document["duration"] > 0
        assert [(s["name"], s["status"], s["attempts"]) for s in document["stages"]] == [
            ("build", "succeeded", 1),
            ("test", "succeeded", 1),
        ]

    def test_json_document_on_failure(self, failing: Path, db: Path) -> None:
        """--json stays machine-readable when the run fails, and the exit status still says it failed."""
        result = invoke("run", failing, "--db", db, "--json")
        assert result.exit_code == 1
        document = json.loads(result.stdout)
        assert document["status"] == "failed"
        assert document["ok"] is False
        assert document["error"].startswith("StageFailedError: stage 'broken' failed")
        stages = {s["name"]: s for s in document["stages"]}
        assert stages["prepare"]["rolled_back"] is True
        assert stages["broken"]["error"].startswith("CommandFailedError: ")
        assert stages["never"]["status"] == "skipped"

    def test_input_values(self, project: Path, db: Path) -> None:
        """--input KEY=VALUE and KEY=@FILE become the request input the stages read as ${KEY}."""
        pipeline = write(
            project / "greet.yaml",
            """
            name: greet
            inputs: [who, greeting]
            stages:
              - name: say
                command: echo ${greeting} ${who}
            """,
        )
        (project / "greeting.txt").write_text("Hello\n", encoding="utf-8")
        result = invoke("run", pipeline, "--db", db, "--input", "who=world", "-i", "greeting=@greeting.txt")
        assert result.exit_code == 0, result.output
        assert "[greet] say | Hello world" in result.stdout
        (run,) = runs_json(db)
        assert show_json(db, run["id"])["input"] == {"who": "world", "greeting": "Hello"}

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("novalue", "--input 'novalue': expected key=value"),
            ("=x", "expected key=value"),
            ("missing=@nope.txt", "cannot read nope.txt"),
        ],
    )
    def test_malformed_input_exits_2(self, hello: Path, db: Path, value: str, fragment: str) -> None:
        """A malformed --input is a usage error: one line, exit 2, nothing run or written."""
        result = invoke("run", hello, "--db", db, "--input", value)
        assert_one_line_error(result, 2, fragment)
        assert not db.exists()

    def test_parallel_limits_stages_running_at_once(self, project: Path) -> None:
        """--parallel 1 runs the stages of a parallel pipeline one at a time."""
        pipeline = write(
            project / "wide.yaml",
            """
            name: wide
            parallel: true
            stages:
              - name: a
                shell: true
                command: echo start >> order.log; sleep 0.2; echo end >> order.log
              - name: b
                shell: true
                command: echo start >> order.log; sleep 0.2; echo end >> order.log
            """,
        )
        result = invoke("run", pipeline, "--no-db", "--parallel", "1")
        assert result.exit_code == 0, result.output
        assert (project / "order.log").read_text().split() == ["start", "end", "start", "end"]
        (project / "order.log").unlink()
        result = invoke("run", pipeline, "--no-db")
        assert result.exit_code == 0, result.output
        assert (project / "order.log").read_text().split() == ["start", "start", "end", "end"]

    def test_parallel_must_be_positive(self, hello: Path) -> None:
        """--parallel 0 is a usage error (exit 2)."""
        result = invoke("run", hello, "--no-db", "--parallel", "0")
        assert result.exit_code == 2
        assert "--parallel" in result.stderr

    def test_dry_run_executes_and_records_nothing(self, failing: Path, db: Path, project: Path) -> None:
        """--dry-run validates every stage, runs none and creates no database."""
        result = invoke("run", failing, "--db", db, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "pipeline 'failing' is valid (3 stages)" in result.stdout
        assert not db.exists()
        assert not (project / "undone").exists()

    def test_no_db_records_nothing(self, hello: Path, db: Path) -> None:
        """--no-db runs without a run history (and says no run id)."""
        result = invoke("run", hello, "--db", db, "--no-db", "--json")
        assert result.exit_code == 0
        assert json.loads(result.stdout)["run_id"] is None
        assert not db.exists()

    def test_db_from_the_environment(self, hello: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """PIPEKIT_DB chooses the run history when --db is not given."""
        monkeypatch.setenv("PIPEKIT_DB", str(db))
        assert invoke("run", hello).exit_code == 0
        assert run_count(db) == 1

    def test_default_db_is_in_the_working_directory(self, hello: Path, project: Path) -> None:
        """Without --db, the run is recorded in .pipekit/pipekit.db of the working directory."""
        assert invoke("run", hello).exit_code == 0
        assert run_count(project / ".pipekit" / "pipekit.db") == 1

    def test_timeout(self, project: Path) -> None:
        """--timeout bounds the whole run: it ends timed out, exit 1."""
        pipeline = write(
            project / "slow.yaml",
            """
            name: slow
            stages:
              - name: nap
                command: sleep 5
            """,
        )
        result = invoke("run", pipeline, "--no-db", "--json", "--timeout", "0.3")
        assert result.exit_code == 1
        assert json.loads(result.stdout)["status"] == "timed_out"

    def test_trio_backend(self, hello: Path, db: Path) -> None:
        """The command runs on trio as well (hidden --backend option)."""
        result = invoke("run", hello, "--db", db, "--backend", "trio")
        assert result.exit_code == 0, result.output
        assert run_count(db) == 1

    def test_leaves_logging_configuration_as_it_was(self, hello: Path) -> None:
        """The command sends pipekit's logs to stderr while it runs, then restores structlog's configuration."""
        before = structlog.get_config()
        configured = structlog.is_configured()
        result = invoke("run", hello, "--no-db", "--log-level", "info")
        assert result.exit_code == 0
        assert "pipekit.pipeline.started" in result.stderr
        assert "pipekit.pipeline.started" not in result.stdout
        assert structlog.is_configured() is configured
        assert structlog.get_config()["processors"] == before["processors"]


class TestPythonPipelines:
    MODULE = f"""
        import pipekit as pk
        from pipekit.ci import CommandStage

        pipeline = pk.Pipeline("pyline").add_stage(CommandStage("hello", [{PYTHON!r}, "-c", "print('from python')"]))


        def make():
            return pk.Pipeline("made").add_stage(CommandStage("hi", ["echo", "made"]))


        not_a_pipeline = 42
        """

    def test_py_file_exposing_pipeline(self, project: Path, db: Path) -> None:
        """A .py file is imported from its path and its ``pipeline`` attribute run."""
        write(project / "build_pipeline.py", self.MODULE)
        result = invoke("run", "build_pipeline.py", "--db", db)
        assert result.exit_code == 0, result.output
        assert "[pyline] hello | from python" in result.stdout

    def test_module_attribute_with_a_factory(self, project: Path, db: Path) -> None:
        """module:attribute imports from the working directory; a callable is called for the pipeline."""
        write(project / "cimod.py", self.MODULE)
        result = invoke("run", "cimod:make", "--db", db)
        assert result.exit_code == 0, result.output
        assert "[made] hi | made" in result.stdout

    def test_py_file_with_an_attribute(self, project: Path) -> None:
        """FILE.py:attribute picks another attribute of a Python file."""
        write(project / "other.py", self.MODULE)
        result = invoke("run", "other.py:make", "--no-db")
        assert result.exit_code == 0, result.output
        assert "[made] hi | made" in result.stdout

    @pytest.mark.parametrize(
        ("target", "fragment"),
        [
            ("cimod:missing", "cimod:missing: no attribute 'missing'"),
            ("cimod:not_a_pipeline", "not_a_pipeline is int, not a pipekit.Pipeline"),
            ("nosuchmodule:pipeline", "no module named 'nosuchmodule'"),
            ("broken.py", "cannot import broken.py: ZeroDivisionError: division by zero"),
            ("syntax.py", "syntax.py:1: invalid Python"),
            ("absent.py", "no such Python file: absent.py"),
            ("cycle.py", "cycle.py: PipelineDefinitionError: "),
        ],
    )
    def test_bad_python_targets_exit_2(self, project: Path, db: Path, target: str, fragment: str) -> None:
        """A Python pipeline that cannot be loaded is one line on stderr, exit 2, no database."""
        write(project / "cimod.py", self.MODULE)
        write(project / "broken.py", "1 / 0\n")
        write(project / "syntax.py", "def (:\n")
        write(
            project / "cycle.py",
            """
            import pipekit as pk
            from pipekit.testing import MockStage

            pipeline = pk.Pipeline("p").add_stage(MockStage("a"), depends_on=["ghost"])
            """,
        )
        result = invoke("run", target, "--db", db)
        assert_one_line_error(result, 2, fragment)
        assert not db.exists()


class TestBadInput:
    CASES: ClassVar[dict[str, tuple[str, str]]] = {
        "malformed-yaml": ("name: x\nstages: [\n", "malformed YAML"),
        "unknown-field": (
            "name: x\nstages:\n  - name: a\n    comand: echo\n",
            "bad.yaml:4: stages[0].comand: unknown field",
        ),
        "wrong-type": ("name: x\nstages:\n  - name: a\n    command: echo\n    timeout: ten\n", "stages[0].timeout"),
        "duplicate-stage": (
            "name: x\nstages:\n  - name: a\n    command: echo\n  - name: a\n    command: echo\n",
            "duplicate stage name 'a'",
        ),
        "cycle": (
            "name: x\nstages:\n  - name: a\n    command: echo\n    depends_on: b\n"
            "  - name: b\n    command: echo\n    depends_on: a\n",
            "dependency cycle",
        ),
        "unknown-variable": ("name: x\nstages:\n  - name: a\n    command: echo ${NOPE}\n", "unknown variable ${NOPE}"),
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_invalid_file_is_one_line_exit_2_and_writes_nothing(self, project: Path, db: Path, case: str) -> None:
        """Each kind of invalid pipeline file: one line naming the problem, exit 2, the run history unchanged."""
        good = write(project / "good.yaml", "name: good\nstages:\n  - name: a\n    command: echo ok\n")
        assert invoke("run", good, "--db", db).exit_code == 0
        before = db.read_bytes()
        text, fragment = self.CASES[case]
        bad = project / "bad.yaml"
        bad.write_text(text, encoding="utf-8")
        for command in ("run", "validate"):
            result = invoke(command, bad, "--db", db) if command == "run" else invoke(command, bad)
            assert_one_line_error(result, 2, fragment)
            assert result.stdout == ""
        assert db.read_bytes() == before
        assert run_count(db) == 1

    def test_several_problems_are_all_reported(self, project: Path) -> None:
        """A file with several problems gets one error line per problem."""
        bad = write(
            project / "bad.yaml",
            """
            name: x
            stages:
              - name: a
                comand: echo
                timeout: ten
            """,
        )
        result = invoke("validate", bad.name)
        assert result.exit_code == 2
        lines = error_lines(result)
        assert len(lines) == 2
        assert all(line.startswith("pipekit: error: bad.yaml:") for line in lines)

    @pytest.mark.parametrize(
        ("target", "fragment"),
        [
            ("missing.yaml", "no such pipeline file: missing.yaml"),
            ("notes.txt", "cannot tell what notes.txt is"),
            ("nothing", "no such pipeline: nothing"),
        ],
    )
    def test_unknown_targets_exit_2(self, project: Path, db: Path, target: str, fragment: str) -> None:
        """A missing file, or one that is not a pipeline, is one line and exit 2."""
        (project / "notes.txt").write_text("hello", encoding="utf-8")
        assert_one_line_error(invoke("run", target, "--db", db), 2, fragment)
        assert not db.exists()

    def test_usage_errors_exit_2(self, hello: Path) -> None:
        """Typer's own usage errors (an unknown option, a missing argument) exit 2."""
        assert invoke("run", hello, "--bogus").exit_code == 2
        assert invoke("run").exit_code == 2
        assert invoke("runs", "--status", "weird").exit_code == 2


class TestStoreErrors:
    def test_newer_schema_version(self, hello: Path, db: Path) -> None:
        """A database written by a newer pipekit: one line, exit 1, nothing run or written."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
        before = db.read_bytes()
        for args in (("run", hello), ("runs",), ("stats",), ("show", "abc")):
            result = invoke(*args, "--db", db)
            assert_one_line_error(result, 1, "schema version 99", "newer than this pipekit supports")
        assert db.read_bytes() == before
        assert run_count(db) == 1

    @pytest.mark.parametrize("where", ["directory", "under-a-file"])
    def test_unusable_path(self, hello: Path, project: Path, where: str) -> None:
        """A database path that cannot be a database file: one line, exit 1, and the pipeline did not run."""
        (project / "afile").write_text("", encoding="utf-8")
        path = project if where == "directory" else project / "afile" / "x.db"
        result = invoke("run", hello, "--db", path)
        assert_one_line_error(result, 1, "run database", str(path))
        assert "[hello] started" not in result.stdout

    def test_not_a_database(self, hello: Path, project: Path) -> None:
        """A file that is not a SQLite database: one line, exit 1, the file untouched."""
        path = project / "junk.db"
        path.write_bytes(b"this is not sqlite" * 100)
        result = invoke("run", hello, "--db", path)
        assert_one_line_error(result, 1, "is not a pipekit run database")
        assert path.read_bytes() == b"this is not sqlite" * 100

    def test_locked_database(self, hello: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A locked database is retried, then one clear line, exit 1; nothing runs, nothing is written."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        monkeypatch.setattr(
            _app, "open_store", lambda path: SqliteStore(path, lock_attempts=3, lock_backoff=0, busy_timeout=0.05)
        )
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            result = invoke("run", hello, "--db", db)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert result.exit_code == 1
        lines = error_lines(result)
        assert lines == [
            f"pipekit: error: database {db} is locked by another process "
            "(gave up after 3 attempts); try again when it has finished"
        ]
        assert "Traceback" not in result.output
        assert "built it" not in result.output  # checked before the pipeline started
        assert run_count(db) == 1

    def test_read_only_database(self, hello: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A database that cannot be written: one line, exit 1, before the pipeline runs; reading still works."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        monkeypatch.setattr(sqlite3, "connect", read_only_connect)
        result = invoke("run", hello, "--db", db)
        assert_one_line_error(result, 1, f"cannot write run database {db}: it is read-only")
        assert "built it" not in result.output  # checked before the pipeline started
        assert len(runs_json(db)) == 1

    def test_reading_commands_never_create_a_database(self, db: Path) -> None:
        """runs/stats on a missing database say there is nothing; show/retry fail with one line; no file appears."""
        result = invoke("runs", "--db", db)
        assert result.exit_code == 0
        assert result.stdout == f"no runs recorded in {db}\n"
        assert invoke("stats", "--db", db).exit_code == 0
        assert_one_line_error(invoke("show", "abc", "--db", db), 1, f"no run history at {db}")
        assert_one_line_error(invoke("retry", "abc", "--db", db), 1, f"no run history at {db}")
        assert not db.exists()
        assert not db.parent.exists()


class TestValidate:
    def test_valid(self, hello: Path) -> None:
        """A pipeline without problems: exit 0 and one line saying so."""
        result = invoke("validate", hello)
        assert result.exit_code == 0
        assert result.stdout == f"{hello}: pipeline 'hello' is valid (2 stages)\n"

    def test_every_problem_is_listed(self, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Validators' and stages' problems are all printed, one per line, then counted; exit 1."""
        monkeypatch.delenv("PIPEKIT_TEST_UNSET_VARIABLE", raising=False)
        pipeline = write(
            project / "checks.yaml",
            """
            name: checks
            inputs: [VERSION]
            validators:
              env: [PIPEKIT_TEST_UNSET_VARIABLE]
              tools: [no-such-tool-xyz]
            stages:
              - name: build
                command: no-such-exe-abc --version ${VERSION}
              - name: test
                command: echo ok
            """,
        )
        result = invoke("validate", pipeline)
        assert result.exit_code == 1
        assert result.stdout.splitlines() == [
            f"{pipeline}: environment variable 'PIPEKIT_TEST_UNSET_VARIABLE' is not set",
            f"{pipeline}: tool 'no-such-tool-xyz' is not on PATH",
            f"{pipeline}: stage 'build': command: unknown variable ${{VERSION}}",
            f"{pipeline}: stage 'build': command: executable 'no-such-exe-abc' not found on PATH",
            "4 problems found in pipeline 'checks'",
        ]
        result = invoke("validate", pipeline, "--input", "VERSION=1", "--json")
        assert result.exit_code == 1
        document = json.loads(result.stdout)
        assert document["valid"] is False
        assert len(document["problems"]) == 3

    def test_python_pipeline(self, project: Path) -> None:
        """``validate`` takes Python pipelines too."""
        write(
            project / "py_checks.py",
            """
            import pipekit as pk
            from pipekit.ci import CommandStage

            pipeline = pk.Pipeline("py").add_stage(CommandStage("a", ["no-such-exe-abc"]))
            """,
        )
        result = invoke("validate", "py_checks.py")
        assert result.exit_code == 1
        assert "executable 'no-such-exe-abc' not found on PATH" in result.stdout


@pytest.fixture
def failed_run(flaky: Path, db: Path, project: Path) -> str:
    """The id of a recorded run of ``flaky`` that failed (``count`` ran once, ``check`` failed)."""
    result = invoke("run", flaky, "--db", db)
    assert result.exit_code == 1
    assert (project / "count.log").read_text().split() == ["ran"]
    (run,) = runs_json(db)
    run_id: str = run["id"]
    return run_id


class TestRuns:
    def test_lists_runs_newest_first(self, failed_run: str, hello: Path, db: Path) -> None:
        """``runs`` shows a table of runs, newest first, with short ids."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        result = invoke("runs", "--db", db)
        assert result.exit_code == 0
        rows = [line for line in result.stdout.splitlines() if "│" in line and "pipeline" not in line]
        assert len(rows) == 2
        assert "hello" in rows[0]
        assert "succeeded" in rows[0]
        assert failed_run[:12] in rows[1]
        assert "failed" in rows[1]

    def test_filters(self, failed_run: str, hello: Path, db: Path) -> None:
        """--pipeline and --status filter the runs."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        assert [r["id"] for r in runs_json(db, "--status", "failed")] == [failed_run]
        assert [r["pipeline"] for r in runs_json(db, "--pipeline", "hello")] == ["hello"]
        assert runs_json(db, "--pipeline", "nope") == []
        result = invoke("runs", "--db", db, "--pipeline", "nope")
        assert result.stdout == f"no runs recorded in {db} match\n"

    def test_status_choices_are_the_stores(self) -> None:
        """--status offers exactly the states the run history knows."""
        assert {s.value for s in RunState} == RUN_STATUSES


class TestShow:
    def test_stage_table_and_logs(self, failed_run: str, db: Path) -> None:
        """``show`` prints the run, a row per stage with its status, and each stage's log tail."""
        result = invoke("show", failed_run[:8], "--db", db)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert out.startswith(f"run {failed_run}  pipeline 'flaky'  FAILED")
        assert "trigger:  cli" in out
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("count", "check"))}
        assert "succeeded" in rows["count"]
        assert "failed" in rows["check"]
        assert "exited with status 1" in rows["check"]
        assert "── check: last 1 line of output ──\nfirst time fails\n" in out

    def test_json(self, failed_run: str, db: Path) -> None:
        """``show`` --json prints the whole record."""
        record = show_json(db, failed_run)
        assert record["id"] == failed_run
        assert [(s["stage"], s["status"]) for s in record["stages"]] == [("count", "succeeded"), ("check", "failed")]
        assert record["stages"][1]["log_tail"] == ["first time fails"]

    def test_unknown_run(self, failed_run: str, db: Path) -> None:
        """An unknown run id: one line, exit 1."""
        assert_one_line_error(invoke("show", "ffffffff", "--db", db), 1, "no run with id 'ffffffff'")


class TestStats:
    def test_counts_and_durations(self, failed_run: str, hello: Path, db: Path) -> None:
        """``stats`` shows runs, success rate and durations per pipeline; an argument picks one pipeline."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        result = invoke("stats", "--db", db)
        assert result.exit_code == 0
        rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
        assert rows.keys() == {"flaky", "hello"}
        assert "0%" in rows["flaky"]
        assert "100%" in rows["hello"]
        result = invoke("stats", "flaky", "--db", db, "--json")
        (entry,) = json.loads(result.stdout)
        assert entry["pipeline"] == "flaky"
        assert (entry["runs"], entry["succeeded"], entry["success_rate"]) == (1, 0, 0.0)
        assert entry["p50_duration"] > 0

    def test_flakiest_stages(self, project: Path, db: Path) -> None:
        """Stages that needed retries are listed as the flakiest."""
        pipeline = write(
            project / "retrying.yaml",
            """
            name: retrying
            stages:
              - name: wobbly
                shell: true
                command: test -f tried || { touch tried; exit 1; }
                retry: {max_attempts: 2, delay: 0}
            """,
        )
        assert invoke("run", pipeline, "--db", db).exit_code == 0
        result = invoke("stats", "retrying", "--db", db)
        assert "wobbly (1 retry)" in result.stdout

    def test_no_runs_of_that_pipeline(self, failed_run: str, db: Path) -> None:
        """``stats`` of a pipeline never run says so."""
        result = invoke("stats", "nope", "--db", db)
        assert result.exit_code == 0
        assert result.stdout == f"no finished runs of pipeline 'nope' in {db}\n"


class TestRetry:
    def test_from_failed_runs_the_failed_stage_again(self, failed_run: str, db: Path) -> None:
        """``retry`` --from-failed runs the recorded pipeline again; it succeeds and is recorded as a retry."""
        result = invoke("retry", failed_run[:10], "--from-failed", "--db", db)
        assert result.exit_code == 0, result.output
        runs = runs_json(db)
        assert len(runs) == 2
        new = runs[0]
        assert new["retry_of"] == failed_run
        assert new["trigger"] == "retry"
        assert new["status"] == "succeeded"
        assert f"run {new['id']} retries run {failed_run}" in result.stdout
        assert show_json(db, new["id"])["definition_hash"] == show_json(db, failed_run)["definition_hash"]

    def test_from_failed_skips_command_stages_that_succeeded(self, failed_run: str, db: Path, project: Path) -> None:
        """The stage that succeeded in the failed run does not run again."""
        assert invoke("retry", failed_run, "--from-failed", "--db", db).exit_code == 0
        assert (project / "count.log").read_text().split() == ["ran"]

    def test_without_from_failed_everything_runs_again(self, failed_run: str, db: Path, project: Path) -> None:
        """A plain retry runs every stage again."""
        result = invoke("retry", failed_run, "--db", db, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["retry_of"] == failed_run
        assert (project / "count.log").read_text().split() == ["ran", "ran"]

    def test_a_retry_can_be_retried(self, project: Path, db: Path) -> None:
        """The retry keeps the definition, so a failed retry can itself be retried."""
        pipeline = write(
            project / "twice.yaml",
            """
            name: twice
            stages:
              - name: third-time-lucky
                shell: true
                command: echo x >> tries; test $(wc -l < tries) -ge 3
            """,
        )
        assert invoke("run", pipeline, "--db", db).exit_code == 1
        (first,) = runs_json(db)
        assert invoke("retry", first["id"], "--db", db).exit_code == 1
        second = runs_json(db)[0]
        assert second["retry_of"] == first["id"]
        assert invoke("retry", second["id"], "--db", db).exit_code == 0
        assert runs_json(db)[0]["retry_of"] == second["id"]

    def test_python_pipeline_from_failed_restores_outputs(self, project: Path, db: Path) -> None:
        """A Python pipeline is loaded again from where it came from; stages whose output was recorded are skipped."""
        write(
            project / "steps.py",
            """
            from pathlib import Path

            import pipekit as pk


            @pk.stage
            async def count(ctx: pk.StageContext) -> dict[str, int]:
                with open("count.log", "a") as log:
                    log.write("ran\\n")
                return {"items": 3}


            @pk.stage
            async def check(ctx: pk.StageContext) -> int:
                marker = Path("marker")
                if not marker.exists():
                    marker.touch()
                    raise RuntimeError("first time fails")
                return ctx.outputs["count"]["items"] * 2


            pipeline = pk.Pipeline("steps").add_stage(count).add_stage(check)
            """,
        )
        assert invoke("run", "steps.py", "--db", db).exit_code == 1
        (failed,) = runs_json(db)
        assert show_json(db, failed["id"])["source"] == str((project / "steps.py").resolve())
        result = invoke("retry", failed["id"], "--from-failed", "--db", db, "--json")
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        stages = {s["name"]: s for s in document["stages"]}
        assert stages["count"]["restored"] is True
        assert stages["count"]["attempts"] == 0
        assert (project / "count.log").read_text().split() == ["ran"]
        new = show_json(db, document["run_id"])
        assert new["retry_of"] == failed["id"]
        assert new["stages"][-1]["output"] == 6
        # --pipeline-from names it explicitly (the file moved, say).
        result = invoke("retry", failed["id"], "--from-failed", "--db", db, "--pipeline-from", "steps.py", "--json")
        assert result.exit_code == 0, result.output
        assert (project / "count.log").read_text().split() == ["ran"]

    def test_a_run_recorded_without_definition_or_source(self, db: Path) -> None:
        """A run recorded from Python (no file, no source) needs --pipeline-from: one line, exit 2."""
        from pipekit.testing import MockStage

        async def record() -> None:
            async with SqliteStore(db) as store, pk.Engine(store=store) as engine:
                await engine.execute(pk.Pipeline("api").add_stage(MockStage("a", error=RuntimeError("no"))))

        anyio.run(record)
        (failed,) = runs_json(db)
        result = invoke("retry", failed["id"], "--db", db)
        assert_one_line_error(result, 2, "recorded without its pipeline's definition", "--pipeline-from")

    def test_a_pipeline_of_another_name(self, failed_run: str, db: Path, hello: Path) -> None:
        """--pipeline-from must name the recorded run's pipeline."""
        result = invoke("retry", failed_run, "--db", db, "--pipeline-from", hello)
        assert_one_line_error(result, 2, "is of pipeline 'flaky', not 'hello'")
        assert run_count(db) == 1

    def test_unknown_run(self, failed_run: str, db: Path) -> None:
        """An unknown run id: one line, exit 1, nothing recorded."""
        assert_one_line_error(invoke("retry", "ffffffff", "--db", db), 1, "no run with id 'ffffffff'")
        assert run_count(db) == 1


class TestUsageErrors:
    """The command as installed (``main``): a usage mistake is one line on stderr and exit 2."""

    @pytest.mark.parametrize(
        ("argv", "line"),
        [
            (["run", "--bogus", "x"], "pipekit: error: No such option: --bogus (see `pipekit run --help`)"),
            (["run"], "pipekit: error: Missing argument 'FILE'. (see `pipekit run --help`)"),
            (["frobnicate"], "pipekit: error: No such command 'frobnicate'. (see `pipekit --help`)"),
        ],
    )
    def test_one_line(self, argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Unknown options and commands and missing arguments: one line naming the mistake, exit 2."""
        with pytest.raises(SystemExit) as exited:
            _app.main(argv)
        assert exited.value.code == 2
        captured = capsys.readouterr()
        assert captured.err == line + "\n"
        assert captured.out == ""

    def test_exit_statuses_pass_through(self, hello: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A command's own exit status is the process's: 0 for a run that succeeded."""
        with pytest.raises(SystemExit) as exited:
            _app.main(["run", str(hello), "--no-db", "--plain"])
        assert exited.value.code == 0
        assert "build | built it" in capsys.readouterr().out


class TestJsonErrors:
    @pytest.fixture
    def newer(self, hello: Path, db: Path) -> Path:
        """A run history written by a newer pipekit."""
        assert invoke("run", hello, "--db", db).exit_code == 0
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
        return db

    @pytest.mark.parametrize(
        ("args", "exit_code"),
        [
            (("run", "bad.yaml"), 2),
            (("run", "hello.yaml", "--input", "novalue"), 2),
            (("run", "hello.yaml", "--db", "{newer}"), 1),
            (("retry", "abc", "--db", "{newer}"), 1),
            (("runs", "--db", "{newer}"), 1),
            (("stats", "--db", "{newer}"), 1),
            (("show", "abc", "--db", "{newer}"), 1),
        ],
    )
    def test_a_failing_command_still_prints_one_json_document(
        self, project: Path, newer: Path, args: tuple[str, ...], exit_code: int
    ) -> None:
        """With --json, an error before there is anything to report is a JSON document too (and a line on stderr)."""
        write(project / "bad.yaml", "name: x\nstages:\n  - name: a\n    comand: ls\n")
        result = invoke(*(a.format(newer=newer) for a in args), "--json")
        assert result.exit_code == exit_code
        document = json.loads(result.stdout)
        messages = [line.removeprefix("pipekit: error: ") for line in error_lines(result)]
        assert document["ok"] is False
        assert document["exit_code"] == exit_code
        assert document["errors"] == messages
        assert document["error"] == messages[0]

    def test_validate_lists_the_problems_of_an_invalid_file(self, project: Path) -> None:
        """``validate --json`` of a file that does not load: the validate document, with every problem."""
        bad = write(project / "bad.yaml", "name: x\nstages:\n  - name: a\n    comand: ls\n    timeout: ten\n")
        result = invoke("validate", bad.name, "--json")
        assert result.exit_code == 2
        document = json.loads(result.stdout)
        assert (document["valid"], document["pipeline"], document["source"]) == (False, None, "bad.yaml")
        assert document["problems"] == [
            "bad.yaml:4: stages[0].comand: unknown field (did you mean 'command'?)",
            'bad.yaml:5: stages[0].timeout: expected a number of seconds, got "ten"',
        ]


class TestSmallCommands:
    def test_schema(self) -> None:
        """``schema`` prints the pipeline files' JSON Schema: the file pipekit ships."""
        from pipekit import spec
        from pipekit.spec._schema import SCHEMA_PATH

        result = invoke("schema")
        assert result.exit_code == 0
        assert json.loads(result.stdout) == spec.json_schema()
        assert result.stdout == SCHEMA_PATH.read_text(encoding="utf-8")

    def test_version(self) -> None:
        """``version`` and --version print pipekit's version."""
        assert invoke("version").stdout == f"pipekit {pk.__version__}\n"
        assert invoke("--version").stdout == f"pipekit {pk.__version__}\n"

    def test_help(self) -> None:
        """No arguments shows the help, listing every command."""
        result = invoke("--help")
        assert result.exit_code == 0
        for command in ("run", "validate", "runs", "show", "stats", "retry", "schema", "version"):
            assert command in result.stdout


class TestClosedPipe:
    @pytest.mark.parametrize("as_json", [False, True])
    def test_the_run_goes_on_when_the_reader_of_stdout_goes_away(self, project: Path, db: Path, as_json: bool) -> None:
        """``pipekit run FILE | head``: the run finishes and is recorded, no traceback, the exit status is the run's."""
        write(
            project / "chatty.yaml",
            """
            name: chatty
            stages:
              - name: talk
                command: seq 1 2000
              - name: last
                command: touch done
            """,
        )
        env = {**os.environ, "PYTHONPATH": str(Path(pk.__file__).parent.parent)}
        args = [PYTHON, "-m", "pipekit.cli", "run", "chatty.yaml", "--db", str(db), *(["--json"] if as_json else [])]
        process = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # the reader goes away before the command writes anything
        try:
            stderr = process.stderr.read().decode()
            returncode = process.wait(timeout=30)
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()
            process.stderr.close()
        assert (returncode, stderr) == (0, "")
        assert (project / "done").exists()
        (run,) = runs_json(db)
        assert run["status"] == "succeeded"


class TestInterrupt:
    @pytest.fixture
    def slow(self, project: Path) -> Path:
        return write(
            project / "slow.yaml",
            """
            name: slow
            stages:
              - name: prepare
                shell: true
                command: echo ready
                rollback: touch undone
              - name: wait
                shell: true
                command: touch started; sleep 30
            """,
        )

    @staticmethod
    async def _interrupt(project: Path, *args: str) -> tuple[int, str, str]:
        """Start ``python -m pipekit.cli ARGS`` in ``project``, SIGINT it once its slow stage started; its outcome."""
        return await signal_cli(project, list(args), [("started", signal.SIGINT)])

    async def test_ctrl_c_cancels_rolls_back_and_exits_130(
        self, slow: Path, project: Path, anyio_backend_name: str
    ) -> None:
        """SIGINT cancels the run, waits for its rollback, prints the summary, records it, exits 130."""
        returncode, out, err = await self._interrupt(
            project, "run", "slow.yaml", "--db", "h.db", "--backend", anyio_backend_name
        )
        assert returncode == 130, (out, err)
        assert (project / "undone").exists()
        assert "Ctrl-C: cancelling the run; waiting for its rollback to finish" in out
        assert "[slow] prepare rolled back" in out
        assert "pipeline 'slow' CANCELLED in " in out
        assert "Traceback" not in err
        async with SqliteStore(project / "h.db") as store:
            (run,) = (await store.list_runs()).runs
        assert run.status == "cancelled"

    async def test_json_says_interrupted(self, slow: Path, project: Path) -> None:
        """With --json, the document of an interrupted run says so."""
        returncode, out, _ = await self._interrupt(project, "run", "slow.yaml", "--no-db", "--json")
        assert returncode == 130
        document = json.loads(out)
        assert document["interrupted"] is True
        assert document["status"] == "cancelled"

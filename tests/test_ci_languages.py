"""Language stages: the argument lists they build, options passed through, dry runs and real runs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import pipekit as pk
from pipekit.ci import (
    CargoBuildStage,
    CargoTestStage,
    CommandFailedError,
    CommandResult,
    CommandStage,
    DockerBuildStage,
    GoBuildStage,
    GoModDownloadStage,
    GoTestStage,
    NpmBuildStage,
    NpmInstallStage,
    PipInstallStage,
    PytestStage,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="CommandStage is POSIX only")

PY = sys.executable
DRY_RUN = pk.RequestOptions(dry_run=True)


def fake_tool(bin_dir: Path, name: str) -> None:
    """Write a fake ``name`` into ``bin_dir`` that prints its name and each argument on a line."""
    path = bin_dir / name
    path.write_text('#!/bin/sh\nprintf \'%s\\n\' "${0##*/}" "$@"\n', encoding="utf-8")
    path.chmod(0o755)


class TestArguments:
    """Each stage builds the argument list (never a shell string) its tool expects."""

    @pytest.mark.parametrize(
        ("stage", "name", "command"),
        [
            (GoModDownloadStage(), "go-mod-download", ("go", "mod", "download")),
            (GoBuildStage(), "go-build", ("go", "build", "./...")),
            (
                GoBuildStage("bin/app", "-s -w -X main.version=${VERSION}"),
                "go-build",
                ("go", "build", "-o", "bin/app", "-ldflags", "-s -w -X main.version=${VERSION}", "./..."),
            ),
            (
                GoBuildStage(Path("out/app"), package="./cmd/app"),
                "go-build",
                ("go", "build", "-o", "out/app", "./cmd/app"),
            ),
            (GoTestStage(), "go-test", ("go", "test", "./...")),
            (
                GoTestStage("./pkg/...", ["-race", "-count=1"]),
                "go-test",
                ("go", "test", "-race", "-count=1", "./pkg/..."),
            ),
            (GoTestStage(args="-run 'TestA|TestB'"), "go-test", ("go", "test", "-run", "TestA|TestB", "./...")),
            (PipInstallStage(), "pip-install", (PY, "-m", "pip", "install", "-r", "requirements.txt")),
            (
                PipInstallStage(["requirements.txt", Path("dev.txt")], python="python3"),
                "pip-install",
                ("python3", "-m", "pip", "install", "-r", "requirements.txt", "-r", "dev.txt"),
            ),
            (PytestStage(), "pytest", (PY, "-m", "pytest")),
            (PytestStage("-x -q tests/"), "pytest", (PY, "-m", "pytest", "-x", "-q", "tests/")),
            (NpmInstallStage(), "npm-install", ("npm", "ci")),
            (NpmInstallStage(ci=False), "npm-install", ("npm", "install")),
            (NpmBuildStage(), "npm-build", ("npm", "run", "build")),
            (NpmBuildStage("lint"), "npm-lint", ("npm", "run", "lint")),
            (CargoBuildStage(), "cargo-build", ("cargo", "build")),
            (CargoBuildStage(release=True), "cargo-build", ("cargo", "build", "--release")),
            (CargoTestStage(), "cargo-test", ("cargo", "test")),
            (
                CargoTestStage(["--all-features", "--", "--nocapture"]),
                "cargo-test",
                ("cargo", "test", "--all-features", "--", "--nocapture"),
            ),
            (
                DockerBuildStage("app:1.0"),
                "docker-build",
                ("docker", "build", "-t", "app:1.0", "-f", "Dockerfile", "."),
            ),
            (
                DockerBuildStage("registry.example.com/app:${VERSION}", "docker/Dockerfile", "src"),
                "docker-build",
                ("docker", "build", "-t", "registry.example.com/app:${VERSION}", "-f", "docker/Dockerfile", "src"),
            ),
        ],
    )
    def test_command(self, stage: CommandStage, name: str, command: tuple[str, ...]) -> None:
        """The default name and the exact argument list."""
        assert isinstance(stage, CommandStage)
        assert stage.name == name
        assert stage.shell is False
        assert stage.command == command

    def test_each_has_a_description(self) -> None:
        """A default description says what the stage does; one given wins."""
        assert GoBuildStage().description == "Build Go packages"
        assert NpmBuildStage("lint").description == "Run the npm script 'lint'"
        assert GoBuildStage(description="Build the server").description == "Build the server"


class TestOptions:
    """Names and CommandStage options pass through; bad parameters are refused clearly."""

    def test_options_reach_the_command_stage(self, tmp_path: Path) -> None:
        """cwd, env, timeout, retry and success_codes configure the CommandStage."""
        policy = pk.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
        stage = CargoTestStage(
            name="unit", cwd=tmp_path, env={"RUST_BACKTRACE": "1"}, timeout=600, retry=policy, success_codes=[0, 101]
        )
        assert stage.name == "unit"
        assert stage.cwd == str(tmp_path)
        assert stage.env == {"RUST_BACKTRACE": "1"}
        assert stage.timeout == 600
        assert stage.retry is policy
        assert stage.success_codes == frozenset({0, 101})

    def test_a_rollback_command_may_hold_paths(self, tmp_path: Path) -> None:
        """``rollback_command`` takes paths in its list, as CommandStage does (and type-checks so)."""
        stage = GoBuildStage(tmp_path / "app", rollback_command=["rm", "-f", tmp_path / "app"])

        assert stage.rollback_command == ("rm", "-f", str(tmp_path / "app"))

    def test_pipeline_uses_the_stage_timeout_and_retry(self) -> None:
        """add_stage picks up the stage's own timeout and retry policy."""
        policy = pk.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)
        pipeline = pk.Pipeline("ci").add_stage(GoTestStage(timeout=300, retry=policy))
        (entry,) = pipeline.entries
        assert entry.timeout == 300
        assert entry.retry is policy

    def test_shell_is_refused(self) -> None:
        """Language stages never run through a shell."""
        with pytest.raises(pk.PipelineDefinitionError, match=r"stage 'go-build': .*never a shell"):
            GoBuildStage(shell=True)  # type: ignore[call-arg]

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda: DockerBuildStage(""), "stage 'docker-build': tag must be a non-empty string, got ''"),
            (lambda: DockerBuildStage("--push"), "stage 'docker-build': tag '--push' would be read as an option"),
            (lambda: NpmBuildStage("-x"), "stage 'npm--x': script '-x' would be read as an option"),
            (lambda: GoBuildStage(output=""), "stage 'go-build': output must be a non-empty string, got ''"),
            (lambda: GoTestStage(args=[1]), r"stage 'go-test': args must be a string or a list of strings, got \[1\]"),  # type: ignore[list-item]
            (lambda: PytestStage("-k 'unclosed"), "stage 'pytest': cannot split args"),
            (lambda: PipInstallStage([]), "stage 'pip-install': requirements is empty"),
            (lambda: CargoBuildStage(timeout=-1), "stage 'cargo-build': timeout must be a number of seconds > 0"),
        ],
    )
    def test_bad_parameters(self, make: Callable[[], object], message: str) -> None:
        """Each bad parameter is a PipelineDefinitionError naming the stage and the parameter."""
        with pytest.raises(pk.PipelineDefinitionError, match=message):
            make()


class TestDryRun:
    """A dry run reports every missing tool at once, executing nothing."""

    async def test_every_missing_tool_reported(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With go, npm, cargo and docker missing from PATH, each stage needing one reports it."""
        empty = tmp_path / "empty"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
        pipeline = (
            pk.Pipeline("ci")
            .add_stage(GoModDownloadStage())
            .add_stage(GoBuildStage("bin/app"))
            .add_stage(PytestStage())  # the interpreter running pipekit: always there
            .add_stage(NpmInstallStage())
            .add_stage(CargoBuildStage(release=True))
            .add_stage(DockerBuildStage("app:${VERSION}"))
            .with_variables(VERSION="1.0")
        )
        response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "stage 'go-mod-download': command: executable 'go' not found on PATH",
            "stage 'go-build': command: executable 'go' not found on PATH",
            "stage 'npm-install': command: executable 'npm' not found on PATH",
            "stage 'cargo-build': command: executable 'cargo' not found on PATH",
            "stage 'docker-build': command: executable 'docker' not found on PATH",
        ]
        assert response.stages["pytest"].reason == "dry run"

    async def test_path_from_the_stage_env(self, tmp_path: Path) -> None:
        """A PATH given in the stage's env is the one searched."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake_tool(bin_dir, "go")
        pipeline = (
            pk.Pipeline("ci")
            .add_stage(GoTestStage(env={"PATH": str(bin_dir)}))
            .add_stage(NpmBuildStage(env={"PATH": str(bin_dir)}))
        )
        response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "stage 'npm-build': command: executable 'npm' not found on PATH"
        ]

    async def test_unknown_variable_reported(self) -> None:
        """A ${NAME} reference that nothing defines is a problem in a dry run."""
        response = (
            await pk.Pipeline("ci")
            .add_stage(DockerBuildStage("app:${VERSION}"))
            .execute(pk.PipelineRequest(options=DRY_RUN))
        )
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == ["stage 'docker-build': command: unknown variable ${VERSION}"]


class TestRealRuns:
    """The stages run their tools with exactly the arguments built, variables expanded."""

    async def test_fake_tools_receive_the_arguments(self, tmp_path: Path) -> None:
        """Each tool is called with the argument list, ${NAME} expanded inside one argument."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("go", "npm", "cargo", "docker"):
            fake_tool(bin_dir, tool)
        env = {"PATH": str(bin_dir)}
        pipeline = (
            pk.Pipeline("ci")
            .add_stage(GoBuildStage("bin/app", "-X main.version=${VERSION}", env=env))
            .add_stage(NpmInstallStage(env=env))
            .add_stage(CargoTestStage("--workspace", env=env))
            .add_stage(DockerBuildStage("app:${VERSION}", env=env))
            .with_variables(VERSION="1.2.3")
        )
        response = await pipeline.execute()
        assert response.ok, response.error
        stdout = {name: out.stdout.splitlines() for name, out in response.outputs.items()}
        assert stdout == {
            "go-build": ["go", "build", "-o", "bin/app", "-ldflags", "-X main.version=1.2.3", "./..."],
            "npm-install": ["npm", "ci"],
            "cargo-test": ["cargo", "test", "--workspace"],
            "docker-build": ["docker", "build", "-t", "app:1.2.3", "-f", "Dockerfile", "."],
        }

    async def test_pytest_stage_runs_pytest(self, tmp_path: Path) -> None:
        """PytestStage runs the tests in its cwd; a failing test fails the stage with the exit status."""
        (tmp_path / "test_ok.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n", encoding="utf-8")
        (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert 1 + 1 == 3\n", encoding="utf-8")
        args = ["-q", "-p", "no:cacheprovider"]
        passing = PytestStage([*args, "test_ok.py"], cwd=tmp_path)
        response = await pk.Pipeline("ok").add_stage(passing).execute()
        assert response.ok, response.error
        result = response.outputs["pytest"]
        assert isinstance(result, CommandResult)
        assert "1 passed" in result.stdout

        failing = PytestStage([*args, "test_bad.py"], cwd=tmp_path)
        response = await pk.Pipeline("bad").add_stage(failing).execute()
        assert response.status is pk.Status.FAILED
        error = response.stages["pytest"].error
        cause = error.__cause__ if isinstance(error, pk.StageFailedError) else error
        assert isinstance(cause, CommandFailedError)
        assert cause.returncode == 1

    async def test_pip_install_stage_runs_pip(self, tmp_path: Path) -> None:
        """PipInstallStage runs pip on the requirements file (one already satisfied, offline)."""
        (tmp_path / "requirements.txt").write_text("packaging\n", encoding="utf-8")
        stage = PipInstallStage(cwd=tmp_path, env={"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        response = await pk.Pipeline("deps").add_stage(stage).execute()
        assert response.ok, response.error
        assert "Requirement already satisfied: packaging" in response.outputs["pip-install"].stdout

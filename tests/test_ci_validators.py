"""Pre-flight validators: EnvVarValidator, Tool and ToolValidator, alone and attached to real pipelines."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import anyio
import psutil  # type: ignore[import-untyped]  # no types-psutil in the dev extra
import pytest

import pipekit as pk
from pipekit.ci import EnvVarValidator, Tool, ToolValidator
from pipekit.testing import MockStage

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake tools are POSIX shell scripts")

DRY_RUN = pk.RequestOptions(dry_run=True)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """An empty directory to put fake tools in (and to use as PATH)."""
    path = tmp_path / "bin"
    path.mkdir()
    return path


def fake_tool(bin_dir: Path, name: str, body: str) -> Path:
    """Write an executable shell script ``name`` into ``bin_dir`` running ``body``."""
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def sleep_command() -> str:
    """The absolute path of ``sleep`` (the fake tools' PATH holds only themselves)."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    return sleep


async def problems(*validators: pk.Validator) -> list[str]:
    """The problems a dry run of a one-stage pipeline with ``validators`` reports."""
    stage = MockStage("build")
    pipeline = pk.Pipeline("ci").add_stage(stage).with_validators(*validators)
    response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))
    assert stage.calls == []
    if response.error is None:
        assert response.ok
        return []
    assert isinstance(response.error, pk.ValidationError)
    return [str(e) for e in response.error.errors]


async def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (waiting up to 5 s for it to be reaped or become a zombie)."""
    with anyio.move_on_after(5):
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            await anyio.sleep(0.05)
    return False


class TestTool:
    """Tool values: built-in defaults per tool, overrides, version parsing and checks."""

    @pytest.mark.parametrize(
        ("name", "args"),
        [
            ("go", ("version",)),
            ("kubectl", ("version", "--client")),
            ("node", ("--version",)),
            ("python3", ("--version",)),
            ("mytool", ("--version",)),
        ],
    )
    def test_default_version_args(self, name: str, args: tuple[str, ...]) -> None:
        """Each known tool gets its own version command; an unknown one runs ``--version``."""
        assert Tool(name).version_args == args

    @pytest.mark.parametrize(
        ("name", "output", "version"),
        [
            ("go", "go version go1.21.3 linux/amd64", "1.21.3"),
            ("go", "go version go1.22 darwin/arm64", "1.22"),
            ("/usr/local/go/bin/go", "go version go1.20.3 linux/amd64", "1.20.3"),
            ("python", "Python 3.11.4", "3.11.4"),
            ("python3.12", "Python 3.12.1", "3.12.1"),
            ("node", "v20.1.0\n", "20.1.0"),
            ("npm", "10.2.4\n", "10.2.4"),
            ("cargo", "cargo 1.75.0 (1d8b05cdd 2023-11-20)", "1.75.0"),
            ("rustc", "rustc 1.75.0 (82e1608df 2023-12-21)", "1.75.0"),
            ("docker", "Docker version 24.0.7, build afdd53b", "24.0.7"),
            ("kubectl", "Client Version: v1.28.2\nKustomize Version: v5.0.4-0.20230601165947-6ce0bf390ce3", "1.28.2"),
            ("kubectl", 'Client Version: version.Info{Major:"1", Minor:"21", GitVersion:"v1.21.0"}', "1.21.0"),
            ("git", "git version 2.39.3 (Apple Git-146)", "2.39.3"),
            ("pip", "pip 23.3.1 from /usr/lib/python3/dist-packages/pip (python 3.11)", "23.3.1"),
            ("terraform", "Terraform v1.6.5\non linux_amd64", "1.6.5"),
        ],
    )
    def test_find_version_with_defaults(self, name: str, output: str, version: str) -> None:
        """The default pattern of each tool reads the version out of its real output."""
        assert Tool(name).find_version(output) == version

    def test_find_version_none_without_match(self) -> None:
        """Output without a version gives None."""
        assert Tool("go").find_version("command not understood") is None

    def test_overrides_win_over_defaults(self) -> None:
        """version_args and version_pattern given by the user replace the built-in ones."""
        tool = Tool("go", min_version="1.21", version_args=("env", "GOVERSION"), version_pattern=r"^go(\S+)")
        assert tool.version_args == ("env", "GOVERSION")
        assert tool.find_version("go1.21.5\n") == "1.21.5"
        assert tool.version_command == "go env GOVERSION"

    @pytest.mark.parametrize(
        ("found", "minimum", "ok"),
        [
            ("1.21.0", "1.21", True),
            ("1.21", "1.21.0", True),
            ("1.20.3", "1.21", False),
            ("1.10.0", "1.9", True),
            ("1.9.9", "1.10", False),
            ("2.0", "1.99.99", True),
            ("20.1.0", "20.1.1", False),
        ],
    )
    def test_check_version_compares_numerically(self, found: str, minimum: str, ok: bool) -> None:
        """Versions compare as versions, not as strings (1.10 is newer than 1.9)."""
        problem = Tool("go", min_version=minimum).check_version(found)
        if ok:
            assert problem is None
        else:
            assert problem == f"tool 'go' {found} is older than the required {minimum}"

    def test_check_version_without_minimum(self) -> None:
        """Without min_version any version is acceptable."""
        assert Tool("go").check_version("0.1") is None

    def test_check_version_rejects_a_non_version(self) -> None:
        """A custom pattern capturing something that is not a version is a problem, not a crash."""
        tool = Tool("x", min_version="1.0", version_pattern=r"version: (\S+)")
        assert tool.check_version("banana") == "tool 'x': 'banana' found in 'x --version' output is not a version"

    def test_invalid_pattern(self) -> None:
        """A pattern that does not compile is a ValueError naming the tool."""
        with pytest.raises(
            ValueError, match=r"^Tool 'go': invalid version_pattern .*: missing \), unterminated subpattern"
        ):
            Tool("go", version_pattern=r"(\d+")

    def test_pattern_without_group(self) -> None:
        """A pattern without a group capturing the version is refused."""
        with pytest.raises(ValueError, match="needs a group capturing the version"):
            Tool("go", version_pattern=r"\d+\.\d+")

    def test_invalid_min_version(self) -> None:
        """A min_version that is not a version is a ValueError."""
        with pytest.raises(ValueError, match=r"^Tool 'go': min_version 'latest' is not a version like '1.21'$"):
            Tool("go", min_version="latest")

    def test_empty_name(self) -> None:
        """A tool needs a name."""
        with pytest.raises(ValueError, match="non-empty executable name"):
            Tool(" ")

    def test_version_args_must_be_a_sequence(self) -> None:
        """A bare string for version_args (split into letters otherwise) is a TypeError."""
        with pytest.raises(TypeError, match=r"sequence of strings like \('--version',\)"):
            Tool("go", version_args="version")

    def test_repr_shows_only_what_differs(self) -> None:
        """The repr names the tool and only the settings that differ from its defaults."""
        assert repr(Tool("go", min_version="1.21")) == "Tool('go', min_version='1.21')"
        assert repr(Tool("node")) == "Tool('node')"
        assert repr(Tool("x", version_args=("-V",))) == "Tool('x', version_args=('-V',))"

    def test_equality(self) -> None:
        """Tools are values: equal when their settings are."""
        assert Tool("go", min_version="1.21") == Tool("go", min_version="1.21", version_args=("version",))
        assert Tool("go") != Tool("go", min_version="1.21")


class TestEnvVarValidator:
    """Required environment variables: every missing or empty one is reported."""

    async def test_all_present(self) -> None:
        """No problem when every variable has a value."""
        assert await problems(EnvVarValidator(["A", "B"], env={"A": "1", "B": "2"})) == []

    async def test_missing_and_empty_each_reported_in_order(self) -> None:
        """Each missing or empty variable is one problem, in the order given."""
        validator = EnvVarValidator(["DEPLOY_TOKEN", "REGION", "USER_NAME"], env={"REGION": "", "USER_NAME": "x"})
        assert await problems(validator) == [
            "environment variable 'DEPLOY_TOKEN' is not set",
            "environment variable 'REGION' is empty",
        ]

    async def test_reads_os_environ_when_it_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """By default os.environ is read at validation time, not at construction."""
        monkeypatch.delenv("PIPEKIT_TEST_TOKEN", raising=False)
        validator = EnvVarValidator(["PIPEKIT_TEST_TOKEN"])
        assert await problems(validator) == ["environment variable 'PIPEKIT_TEST_TOKEN' is not set"]
        monkeypatch.setenv("PIPEKIT_TEST_TOKEN", "s3cret")
        assert await problems(validator) == []

    def test_repr_never_shows_values(self) -> None:
        """The repr lists the names and never the environment's values."""
        validator = EnvVarValidator(["TOKEN"], env={"TOKEN": "s3cret"})
        assert repr(validator) == "EnvVarValidator(required=('TOKEN',))"

    def test_a_single_string_is_refused(self) -> None:
        """A bare string (which would be split into letters) is a TypeError suggesting a list."""
        with pytest.raises(TypeError, match=r"use \['TOKEN'\]"):
            EnvVarValidator("TOKEN")

    @pytest.mark.parametrize("name", ["", "A=B", 3])
    def test_bad_names(self, name: object) -> None:
        """Something that cannot be a variable name is a ValueError."""
        with pytest.raises(ValueError, match="is not an environment variable name"):
            EnvVarValidator([name])  # type: ignore[list-item]


class TestToolValidator:
    """Tools on PATH at a minimum version, checked concurrently, every problem reported."""

    async def test_tools_present_and_new_enough(self, bin_dir: Path) -> None:
        """No problem when each tool is found and new enough."""
        fake_tool(bin_dir, "go", 'echo "go version go1.21.3 linux/amd64"')
        fake_tool(bin_dir, "node", "echo v20.1.0")
        validator = ToolValidator([Tool("go", min_version="1.21"), Tool("node", min_version="18")], path=str(bin_dir))
        assert await problems(validator) == []

    async def test_every_problem_in_the_order_given(self, bin_dir: Path) -> None:
        """Missing, too old, unreadable and failing tools are all reported, in the order given."""
        fake_tool(bin_dir, "go", 'echo "go version go1.20.3 linux/amd64"')
        fake_tool(bin_dir, "node", "echo 'no version here'")
        fake_tool(bin_dir, "cargo", "echo 'error: broken toolchain' >&2; exit 1")
        validator = ToolValidator(
            [
                Tool("go", min_version="1.21"),
                "docker",
                Tool("node", min_version="18"),
                Tool("cargo", min_version="1.70"),
                Tool("kubectl", min_version="1.28"),
            ],
            path=str(bin_dir),
        )
        assert await problems(validator) == [
            "tool 'go' 1.20.3 is older than the required 1.21",
            "tool 'docker' is not on PATH",
            "tool 'node': could not find a version in 'node --version' output: 'no version here'",
            "tool 'cargo': 'cargo --version' exited with status 1: 'error: broken toolchain'",
            "tool 'kubectl' is not on PATH",
        ]

    async def test_tool_without_min_version_is_not_run(self, bin_dir: Path, tmp_path: Path) -> None:
        """A tool without min_version only has to be on PATH: its version command never runs."""
        marker = tmp_path / "ran"
        fake_tool(bin_dir, "docker", f"touch {marker}; exit 1")
        assert await problems(ToolValidator(["docker"], path=str(bin_dir))) == []
        assert not marker.exists()

    async def test_not_executable_is_not_on_path(self, bin_dir: Path) -> None:
        """A file that is not executable does not count as the tool."""
        fake_tool(bin_dir, "go", "echo go1.22").chmod(0o644)
        assert await problems(ToolValidator(["go"], path=str(bin_dir))) == ["tool 'go' is not on PATH"]

    async def test_hanging_version_command_is_killed(self, bin_dir: Path, tmp_path: Path) -> None:
        """A version command that hangs is a problem after ``timeout``, and it and its children are killed."""
        pids = tmp_path / "pids"
        fake_tool(bin_dir, "go", f"{sleep_command()} 30 & echo $$ $! > {pids}; wait")
        validator = ToolValidator([Tool("go", min_version="1.21")], path=str(bin_dir), timeout=0.5)
        assert await problems(validator) == ["tool 'go': 'go version' did not finish within 0.5s"]
        shell, child = map(int, pids.read_text(encoding="utf-8").split())
        assert await gone(shell)
        assert await gone(child)

    async def test_tools_are_checked_concurrently(self, bin_dir: Path) -> None:
        """Three hanging tools with a 1 s timeout take about 1 s together, not 3 s."""
        for name in ("go", "node", "cargo"):
            fake_tool(bin_dir, name, f"exec {sleep_command()} 30")
        validator = ToolValidator(
            [Tool(name, min_version="1") for name in ("go", "node", "cargo")], path=str(bin_dir), timeout=1.0
        )
        start = anyio.current_time()
        found = await problems(validator)
        assert len(found) == 3
        assert all("did not finish within 1s" in p for p in found)
        assert anyio.current_time() - start < 2.5

    async def test_stderr_output_is_read(self, bin_dir: Path) -> None:
        """Tools that print their version on standard error are understood."""
        fake_tool(bin_dir, "python", "echo 'Python 2.7.18' >&2")
        validator = ToolValidator([Tool("python", min_version="3.8")], path=str(bin_dir))
        assert await problems(validator) == ["tool 'python' 2.7.18 is older than the required 3.8"]

    async def test_version_command_runs_with_the_given_path(self, bin_dir: Path) -> None:
        """The version command sees the validator's PATH (a tool wrapping another one finds it)."""
        fake_tool(bin_dir, "npm", "node-version-helper")
        fake_tool(bin_dir, "node-version-helper", "echo 10.2.4")
        assert await problems(ToolValidator([Tool("npm", min_version="10")], path=str(bin_dir))) == []

    async def test_defaults_to_the_path_variable(self, bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without ``path=``, the PATH environment variable at validation time is searched."""
        fake_tool(bin_dir, "go", 'echo "go version go1.22.0 linux/amd64"')
        validator = ToolValidator([Tool("go", min_version="1.21"), "cargo"])
        monkeypatch.setenv("PATH", str(bin_dir))
        assert await problems(validator) == ["tool 'cargo' is not on PATH"]

    def test_repr(self) -> None:
        """The repr lists the tools and the settings."""
        validator = ToolValidator([Tool("go", min_version="1.21"), "git"], timeout=5)
        assert (
            repr(validator)
            == "ToolValidator(tools=(Tool('go', min_version='1.21'), Tool('git')), path=None, timeout=5)"
        )

    def test_a_single_tool_is_refused(self) -> None:
        """A bare name or Tool instead of a list is a TypeError suggesting a list."""
        with pytest.raises(TypeError, match=r"use \['go'\]"):
            ToolValidator("go")
        with pytest.raises(TypeError, match=r"use \[Tool\('go'\)\]"):
            ToolValidator(Tool("go"))  # type: ignore[arg-type]

    def test_bad_tool(self) -> None:
        """Something that is neither a Tool nor a name is a TypeError."""
        with pytest.raises(TypeError, match=r"must be pipekit\.ci\.Tool objects or names, got 3"):
            ToolValidator([3])  # type: ignore[list-item]

    @pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True])
    def test_bad_timeout(self, timeout: float) -> None:
        """The timeout must be a positive, finite number of seconds."""
        with pytest.raises(ValueError, match="positive number of seconds"):
            ToolValidator(["go"], timeout=timeout)


class TestInPipelines:
    """Attached with with_validators: they run first, and nothing executes when one fails."""

    @pytest.fixture
    def tools(self, bin_dir: Path) -> Path:
        """A PATH with an outdated go, a current node and nothing else."""
        fake_tool(bin_dir, "go", 'echo "go version go1.20.3 linux/amd64"')
        fake_tool(bin_dir, "node", "echo v20.1.0")
        return bin_dir

    async def test_real_run_executes_nothing_and_lists_every_problem(self, tools: Path) -> None:
        """A real run fails before any stage with one ValidationError listing each problem."""
        build, deploy = MockStage("build"), MockStage("deploy")
        pipeline = (
            pk.Pipeline("release")
            .add_stage(build)
            .add_stage(deploy)
            .with_validators(
                EnvVarValidator(["DEPLOY_TOKEN", "REGION"], env={"REGION": "eu"}),
                ToolValidator(
                    [Tool("go", min_version="1.21"), "docker", Tool("node", min_version="18")], path=str(tools)
                ),
            )
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert build.calls == []
        assert deploy.calls == []
        assert {r.status for r in response.stages.values()} == {pk.Status.SKIPPED}
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "environment variable 'DEPLOY_TOKEN' is not set",
            "tool 'go' 1.20.3 is older than the required 1.21",
            "tool 'docker' is not on PATH",
        ]
        assert str(response.error).startswith("pre-flight validation of pipeline 'release' found 3 problems: ")

    async def test_dry_run_lists_all_missing_tools_and_variables_at_once(self, bin_dir: Path) -> None:
        """A dry run reports every missing tool and variable together, executing nothing."""
        stage = MockStage("build")
        pipeline = (
            pk.Pipeline("ci")
            .add_stage(stage)
            .with_validators(
                ToolValidator(["go", "npm", "cargo", "docker"], path=str(bin_dir)),
                EnvVarValidator(["REGISTRY", "DEPLOY_TOKEN"], env={}),
            )
        )
        response = await pipeline.execute(pk.PipelineRequest(options=DRY_RUN))
        assert stage.calls == []
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "tool 'go' is not on PATH",
            "tool 'npm' is not on PATH",
            "tool 'cargo' is not on PATH",
            "tool 'docker' is not on PATH",
            "environment variable 'REGISTRY' is not set",
            "environment variable 'DEPLOY_TOKEN' is not set",
        ]
        assert str(response.error).startswith("dry run of pipeline 'ci' found 6 problems: ")

    async def test_success_runs_the_stages(self, tools: Path) -> None:
        """When every check passes the stages run as usual."""
        build = MockStage("build", output="artifact")
        pipeline = (
            pk.Pipeline("release")
            .add_stage(build)
            .with_validators(
                EnvVarValidator(["DEPLOY_TOKEN"], env={"DEPLOY_TOKEN": "t"}),
                ToolValidator([Tool("node", min_version="18.17"), "go"], path=str(tools)),
            )
        )
        response = await pipeline.execute()
        assert response.ok
        assert len(build.calls) == 1
        assert response.outputs == {"build": "artifact"}

    async def test_nested_pipeline_validators_run_first(self, tools: Path) -> None:
        """A nested pipeline's validators run before the outer pipeline's first stage."""
        first, inner_stage = MockStage("first"), MockStage("inner-stage")
        inner = (
            pk.Pipeline("inner")
            .add_stage(inner_stage)
            .with_validators(ToolValidator([Tool("go", min_version="1.21")], path=str(tools)))
        )
        response = await pk.Pipeline("outer").add_stage(first).add_stage(inner).execute()
        assert first.calls == []
        assert inner_stage.calls == []
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == ["tool 'go' 1.20.3 is older than the required 1.21"]

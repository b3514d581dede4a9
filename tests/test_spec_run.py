"""Pipelines loaded from files really run: real commands, in order or at once, retried, skipped, rolled back.

Every command is a real process (``sh``, ``git``, fake ``docker`` and
``kubectl`` scripts on a private PATH) working in ``tmp_path``; each test
runs in ``tmp_path`` as its working directory, so nothing can touch the
repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pipekit as pk
from pipekit.ci import CommandFailedError, CommandResult
from pipekit.spec import loads

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the commands are POSIX")

DRY_RUN = pk.PipelineRequest(options=pk.RequestOptions(dry_run=True))


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test works in its own temporary directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pipeline_of(text: str) -> pk.Pipeline:
    """The pipeline of a (dedented) YAML pipeline file."""
    return loads(textwrap.dedent(text), source="pipeline.yaml")


def lines(path: str | Path) -> list[str]:
    """The lines of a file the commands wrote."""
    return Path(path).read_text(encoding="utf-8").split()


def exists(path: str | Path) -> bool:
    """Whether a command created ``path``."""
    return Path(path).exists()


def write(path: str | Path, text: str) -> None:
    """Write a file for the commands."""
    Path(path).write_text(text, encoding="utf-8")


def make_dir(path: str | Path) -> None:
    """Create a directory for the commands."""
    Path(path).mkdir()


def remove(path: str | Path) -> None:
    """Remove a file the commands wrote."""
    Path(path).unlink()


def cause_of(response: pk.PipelineResponse) -> BaseException:
    """The original exception of a failed run."""
    assert isinstance(response.error, pk.StageFailedError), response.error
    assert response.error.__cause__ is not None
    return response.error.__cause__


def statuses(response: pk.PipelineResponse) -> dict[str, pk.Status]:
    """Each stage's final status."""
    return {name: result.status for name, result in response.stages.items()}


class TestFlatForm:
    async def test_runs_in_order(self) -> None:
        """Stages run one after another, in the order listed; each output is its command's result."""
        pipeline = pipeline_of(
            """\
            name: flat
            stages:
              - {name: first, type: Run, command: "sh -c 'echo first >> order.txt'"}
              - {name: second, command: "sh -c 'echo second >> order.txt'", timeout: 30}
              - {name: third, command: "sh -c 'echo third >> order.txt; echo done'"}
            """
        )
        response = await pipeline.execute()
        assert response.ok, response.error
        assert lines("order.txt") == ["first", "second", "third"]
        third = response.outputs["third"]
        assert isinstance(third, CommandResult)
        assert (third.returncode, third.stdout) == (0, "done\n")

    async def test_parallel_runs_at_once(self) -> None:
        """With ``parallel: true`` the stages run concurrently: each waits for a file the other writes."""
        wait_for = (
            "touch {me}.flag; i=0; "
            "while [ ! -f {other}.flag ]; do i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done"
        )
        pipeline = pipeline_of(
            f"""\
            name: flat
            parallel: true
            stages:
              - name: a
                command: "sh -c '{wait_for.format(me="a", other="b")}'"
                timeout: 30
              - name: b
                command: "sh -c '{wait_for.format(me="b", other="a")}'"
                timeout: 30
            """
        )
        response = await pipeline.execute()
        assert response.ok, response.error
        assert statuses(response) == {"a": pk.Status.SUCCEEDED, "b": pk.Status.SUCCEEDED}

    async def test_dry_run(self) -> None:
        """A dry run checks every command's executable and runs none."""
        pipeline = pipeline_of(
            """\
            name: flat
            stages:
              - {name: a, command: "sh -c 'touch ran.txt'"}
            """
        )
        response = await pipeline.execute(DRY_RUN)
        assert response.ok, response.error
        assert not exists("ran.txt")
        pipeline = pipeline_of(
            """\
            name: flat
            stages:
              - {name: a, command: "sh -c 'touch ran.txt'"}
              - {name: b, command: no-such-tool-for-pipekit --version}
            """
        )
        response = await pipeline.execute(DRY_RUN)
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        assert "stage 'b': command: executable 'no-such-tool-for-pipekit' not found on PATH" in str(response.error)
        assert not exists("ran.txt")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A local git repository with one commit, holding README.md."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git = ["git", "-c", "user.name=pipekit", "-c", "user.email=pipekit@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "README.md").write_text("hello from the repository\n", encoding="utf-8")
    subprocess.run([*git, "add", "README.md"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    return repo


class TestGitRepository:
    async def test_clone_into_a_fresh_workspace(self, repository: Path, tmp_path: Path) -> None:
        """The checkout clones the repository; stages run inside the clone; a second run starts from a fresh clone."""
        pipeline = pipeline_of(
            f"""\
            name: Web App
            git_repository: file://{repository}
            stages:
              - {{name: show, command: cat README.md}}
              - {{name: dirty, command: "sh -c 'echo leftover > scratch.txt'"}}
            """
        )
        workspace = tmp_path / ".pipekit" / "workspace" / "Web-App"
        for _ in range(2):
            response = await pipeline.execute()
            assert response.ok, response.error
            assert list(response.stages) == ["checkout", "show", "dirty"]
            assert response.outputs["show"].stdout == "hello from the repository\n"
            assert (workspace / "scratch.txt").exists()
        assert sorted(p.name for p in workspace.iterdir()) == [".git", "README.md", "scratch.txt"]

    async def test_a_condition_may_read_the_checkout(self, repository: Path) -> None:
        """``when: outputs.checkout.returncode == 0`` loads and runs: the clone is a stage like the others."""
        pipeline = pipeline_of(
            f"""\
            name: app
            git_repository: file://{repository}
            workspace: ws
            stages:
              - name: show
                command: cat README.md
                when: outputs.checkout.returncode == 0
            """
        )
        response = await pipeline.execute()
        assert response.ok, response.error
        assert response.stages["show"].status is pk.Status.SUCCEEDED

    async def test_dry_run_clones_nothing(self, repository: Path) -> None:
        """A dry run checks git and the stages' executables without cloning."""
        pipeline = pipeline_of(
            f"""\
            name: app
            git_repository: file://{repository}
            workspace: ws
            stages: [{{name: show, command: cat README.md}}]
            """
        )
        response = await pipeline.execute(DRY_RUN)
        assert response.ok, response.error
        assert not exists("ws")

    @pytest.mark.parametrize("workspace", [".", "..", "/"])
    async def test_refuses_to_delete_a_dangerous_workspace(self, repository: Path, workspace: str) -> None:
        """A workspace that is the current directory (or a parent, or a root) is refused before anything runs."""
        write("keep.txt", "precious")
        pipeline = pipeline_of(
            f"""\
            name: app
            git_repository: file://{repository}
            workspace: "{workspace}"
            stages: [{{name: show, command: cat README.md}}]
            """
        )
        for request in (DRY_RUN, None):
            response = await pipeline.execute(request)
            assert response.status is pk.Status.FAILED
            assert f"refusing to delete the workspace '{workspace}'" in str(response.error)
        assert lines("keep.txt") == ["precious"]

    async def test_refuses_to_delete_a_directory_that_is_not_a_clone(self, repository: Path) -> None:
        """An existing workspace holding files but no .git is never deleted: the run fails before anything runs."""
        pipeline = pipeline_of(
            f"""\
            name: app
            git_repository: file://{repository}
            workspace: src
            stages: [{{name: show, command: cat README.md}}]
            """
        )
        make_dir("src")
        write("src/main.py", "print('hi')")
        for request in (DRY_RUN, None):
            response = await pipeline.execute(request)
            assert response.status is pk.Status.FAILED
            assert "refusing to delete the workspace 'src': it holds files but is not a git clone" in str(
                response.error
            )
        assert lines("src/main.py") == ["print('hi')"]


class TestFullForm:
    async def test_variables_and_inputs(self) -> None:
        """``${NAME}`` reads variables and request input (input wins); plain and secret env values reach the command."""
        pipeline = pipeline_of(
            """\
            name: full
            variables: {GREETING: hello, WHO: nobody, COUNT: 3, LOUD: true}
            inputs: [WHO]
            stages:
              - name: greet
                command: [sh, -c, 'echo "${GREETING} $WHOM ${COUNT} ${LOUD}"']
                env:
                  WHOM: "${WHO}"
              - name: secret
                shell: true
                command: echo "token=$TOKEN" && echo "$$HOME is a shell variable"
                env:
                  TOKEN: {value: s3cret-value, secret: true}
            """
        )
        response = await pipeline.execute(input={"WHO": "world"})
        assert response.ok, response.error
        assert response.outputs["greet"].stdout == "hello world 3 true\n"
        secret = response.outputs["secret"].stdout.splitlines()
        assert secret[0] == "token=***"
        assert secret[1] == f"{os.environ['HOME']} is a shell variable"

    async def test_when(self) -> None:
        """Conditions skip or run stages from variables, input and earlier outputs."""
        pipeline = pipeline_of(
            """\
            name: full
            variables: {ENV: staging}
            inputs: [force]
            stages:
              - {name: probe, command: "sh -c 'echo ready'"}
              - {name: prod-only, command: "true", when: 'variables.ENV == "prod"'}
              - {name: forced, command: "true", when: input.force == true, depends_on: [probe]}
              - name: after-probe
                command: "true"
                depends_on: [probe]
                when: 'outputs.probe.returncode == 0 and outputs.probe.stdout == "ready\\n"'
              - {name: skipped-dep, command: "true", depends_on: [prod-only], when: "outputs['prod-only'] == null"}
            """
        )
        response = await pipeline.execute()
        assert response.ok, response.error
        assert statuses(response) == {
            "probe": pk.Status.SUCCEEDED,
            "prod-only": pk.Status.SKIPPED,
            "forced": pk.Status.SKIPPED,
            "after-probe": pk.Status.SUCCEEDED,
            "skipped-dep": pk.Status.SUCCEEDED,
        }
        response = await pipeline.execute(input={"force": True})
        assert statuses(response)["forced"] is pk.Status.SUCCEEDED

    async def test_retry(self) -> None:
        """A flaky command is retried per the spec's policy until it succeeds."""
        flaky = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; [ $n -ge 3 ]"
        text = f"""\
            name: full
            stages:
              - name: flaky
                shell: true
                command: '{flaky}'
                retry: {{max_attempts: MAX, delay: 0, backoff: 1, max_delay: 0}}
            """
        response = await pipeline_of(text.replace("MAX", "3")).execute()
        assert response.ok, response.error
        assert response.stages["flaky"].attempts == 3
        assert lines("count") == ["3"]
        remove("count")
        response = await pipeline_of(text.replace("MAX", "2")).execute()
        assert response.status is pk.Status.FAILED
        assert response.stages["flaky"].attempts == 2
        assert isinstance(cause_of(response), CommandFailedError)

    async def test_steps_run_in_order_and_stop_at_the_first_failure(self) -> None:
        """Steps run in order as one stage; the first failing step fails it and the rest do not run."""
        pipeline = pipeline_of(
            """\
            name: full
            stages:
              - name: ok
                steps:
                  - sh -c 'echo one >> steps.txt'
                  - {name: two, command: [sh, -c, "echo two >> steps.txt"]}
                  - script: |
                      echo three >> steps.txt
                      echo three-b >> steps.txt
              - name: broken
                steps:
                  - sh -c 'echo four >> steps.txt'
                  - {name: boom, script: "echo five >> steps.txt; exit 3"}
                  - sh -c 'echo six >> steps.txt'
            """
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert lines("steps.txt") == ["one", "two", "three", "three-b", "four", "five"]
        assert [r.returncode for r in response.stages["ok"].output] == [0, 0, 0]
        cause = cause_of(response)
        assert isinstance(cause, CommandFailedError)
        assert cause.returncode == 3
        assert str(cause) == "command 'echo five >> steps.txt; exit 3' exited with status 3"

    async def test_rollback_commands_run_after_a_later_failure(self) -> None:
        """Completed stages are compensated in reverse, each stage's rollback commands in the order written."""
        pipeline = pipeline_of(
            """\
            name: full
            stages:
              - name: migrate
                command: sh -c 'echo migrate >> log.txt'
                rollback:
                  - sh -c 'echo undo-migrate-1 >> log.txt'
                  - [sh, -c, "echo undo-migrate-2 >> log.txt"]
              - name: setup
                steps:
                  - sh -c 'echo setup >> log.txt'
                rollback: sh -c 'echo undo-setup >> log.txt'
              - name: upload
                command: sh -c 'echo upload >> log.txt'
                rollback: sh -c 'echo undo-upload >> log.txt'
              - name: deploy
                command: sh -c 'exit 1'
                rollback: sh -c 'echo never >> log.txt'
            """
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert lines("log.txt") == [
            "migrate", "setup", "upload", "undo-upload", "undo-setup", "undo-migrate-1", "undo-migrate-2",
        ]  # fmt: skip
        assert statuses(response) == {
            "migrate": pk.Status.ROLLED_BACK,
            "setup": pk.Status.ROLLED_BACK,
            "upload": pk.Status.ROLLED_BACK,
            "deploy": pk.Status.FAILED,
        }

    async def test_continue_on_error(self) -> None:
        """A failure with continue_on_error is recorded; its dependents are skipped, the others run."""
        pipeline = pipeline_of(
            """\
            name: full
            stages:
              - {name: flaky-lint, command: "false", continue_on_error: true}
              - {name: needs-lint, command: "true"}
              - {name: independent, command: "true", depends_on: []}
            """
        )
        response = await pipeline.execute()
        assert statuses(response) == {
            "flaky-lint": pk.Status.FAILED,
            "needs-lint": pk.Status.SKIPPED,
            "independent": pk.Status.SUCCEEDED,
        }

    async def test_timeout(self) -> None:
        """A stage's timeout ends its command."""
        pipeline = pipeline_of(
            """\
            name: full
            stages:
              - {name: slow, command: sleep 30, timeout: 200ms}
            """
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.TIMED_OUT
        assert isinstance(response.error, pk.StageTimeoutError)
        assert response.error.timeout == pytest.approx(0.2)

    async def test_validators(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Declared validators (and from_env values missing at load) fail the pre-flight, naming each problem."""
        monkeypatch.delenv("PIPEKIT_SPEC_UNSET", raising=False)
        pipeline = pipeline_of(
            """\
            name: full
            validators:
              env: [PIPEKIT_SPEC_UNSET]
              tools: [sh, no-such-tool-for-pipekit]
            stages:
              - name: a
                command: sh -c 'touch ran.txt'
                env:
                  TOKEN: {from_env: PIPEKIT_SPEC_UNSET_TOO, secret: true}
            """
        )
        response = await pipeline.execute()
        assert response.status is pk.Status.FAILED
        assert isinstance(response.error, pk.ValidationError)
        problems = str(response.error)
        assert "environment variable 'PIPEKIT_SPEC_UNSET' is not set" in problems
        assert "environment variable 'PIPEKIT_SPEC_UNSET_TOO' is not set" in problems
        assert "no-such-tool-for-pipekit" in problems
        assert not exists("ran.txt")


@pytest.fixture
def fake_tools(tmp_path: Path) -> Path:
    """A directory with fake ``docker`` and ``kubectl`` that log their arguments to ``tools.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kubectl"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/tools.log"\n', encoding="utf-8")
        script.chmod(0o755)
    return bin_dir


class TestBuildAndDeploy:
    def pipeline(self, path: str, **extra: Any) -> pk.Pipeline:
        return pipeline_of(
            f"""\
            name: ship
            variables: {{VERSION: "2.0"}}
            stages:
              - name: image
                type: Build
                tag: app:${{VERSION}}
                env: {{PATH: "{path}"}}
              - name: release
                type: Deploy
                manifest: k8s/app.yaml
                cluster: prod
                namespace: shop
                env: {{PATH: "{path}"}}
                rollback: kubectl rollout undo deployment/app
              - name: smoke
                command: sh -c 'exit {extra.get("smoke", 0)}'
            """
        )

    async def test_commands(self, fake_tools: Path, tmp_path: Path) -> None:
        """Build runs ``docker build -t TAG -f Dockerfile .``; Deploy, ``kubectl apply`` with context and namespace."""
        response = await self.pipeline(str(fake_tools)).execute()
        assert response.ok, response.error
        assert (tmp_path / "tools.log").read_text(encoding="utf-8").splitlines() == [
            "docker build -t app:2.0 -f Dockerfile .",
            "kubectl apply -f k8s/app.yaml --context prod --namespace shop",
        ]

    async def test_rollback(self, fake_tools: Path, tmp_path: Path) -> None:
        """A later failure runs the Deploy stage's rollback command."""
        response = await self.pipeline(str(fake_tools), smoke=1).execute()
        assert response.status is pk.Status.FAILED
        assert (tmp_path / "tools.log").read_text(encoding="utf-8").splitlines()[-1] == (
            "kubectl rollout undo deployment/app"
        )

    async def test_dry_run_checks_the_tools(self, fake_tools: Path, tmp_path: Path) -> None:
        """A dry run finds docker and kubectl on the stage's PATH, and names each one that is missing."""
        response = await self.pipeline(str(fake_tools)).execute(DRY_RUN)
        assert response.ok, response.error
        empty = tmp_path / "empty"
        empty.mkdir()
        response = await self.pipeline(str(empty)).execute(DRY_RUN)
        assert response.status is pk.Status.FAILED
        problems = str(response.error)
        assert "stage 'image': command: executable 'docker' not found on PATH" in problems
        assert "stage 'release': command: executable 'kubectl' not found on PATH" in problems
        assert "stage 'release': rollback_command: executable 'kubectl' not found on PATH" in problems
        assert not (tmp_path / "tools.log").exists()

    async def test_flat_form_commands(self, fake_tools: Path, tmp_path: Path) -> None:
        """A flat-form Build or Deploy stage runs the command it names; a dry run checks its executable."""

        def flat(path: Path) -> pk.Pipeline:
            return pipeline_of(
                f"""\
                name: flat
                stages:
                  - name: image
                    type: Build
                    command: docker build -t app:1 .
                    timeout: 60
                    env: {{PATH: "{path}"}}
                  - name: release
                    type: Deploy
                    command: [kubectl, apply, -f, k8s/]
                    timeout: 2m
                    env: {{PATH: "{path}"}}
                """
            )

        response = await flat(fake_tools).execute()
        assert response.ok, response.error
        assert (tmp_path / "tools.log").read_text(encoding="utf-8").splitlines() == [
            "docker build -t app:1 .",
            "kubectl apply -f k8s/",
        ]
        empty = tmp_path / "empty"
        empty.mkdir()
        response = await flat(empty).execute(DRY_RUN)
        assert isinstance(response.error, pk.ValidationError)
        assert [str(e) for e in response.error.errors] == [
            "stage 'image': command: executable 'docker' not found on PATH",
            "stage 'release': command: executable 'kubectl' not found on PATH",
        ]

"""Language stages: typed factories over `CommandStage` for Go, Python, JavaScript, Rust and Docker.

Each one builds an argument list (never a shell string) from a few typed
parameters and is otherwise a [`CommandStage`][pipekit.ci.CommandStage]:
``cwd``, ``env``, ``timeout``, ``retry``... pass through, ``${NAME}``
references are expanded, and a dry run reports its tool missing from PATH.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import TypedDict, Unpack

from pipekit._errors import PipelineDefinitionError
from pipekit._policy import RetryPolicy
from pipekit.ci._command import CommandStage
from pipekit.ci._template import Secret

__all__ = [
    "CargoBuildStage",
    "CargoTestStage",
    "CommandOptions",
    "DockerBuildStage",
    "GoBuildStage",
    "GoModDownloadStage",
    "GoTestStage",
    "NpmBuildStage",
    "NpmInstallStage",
    "PipInstallStage",
    "PytestStage",
]

PathLike = str | os.PathLike[str]


class CommandOptions(TypedDict, total=False):
    """The [`CommandStage`][pipekit.ci.CommandStage] options every language stage passes through.

    See `CommandStage` for what each one does. ``shell`` is not among them:
    language stages always run an argument list.
    """

    cwd: PathLike | None
    env: Mapping[str, str | Secret] | None
    inherit_env: bool
    timeout: float | None
    retry: RetryPolicy | None
    success_codes: Sequence[int]
    rollback_command: str | Sequence[PathLike] | None
    description: str
    tail_bytes: int
    log_file: PathLike | None
    kill_grace: float


def _args(stage: str, what: str, value: str | Sequence[str]) -> list[str]:
    """Extra arguments: a string is split like a shell would, a sequence is taken as is."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise PipelineDefinitionError(f"stage {stage!r}: cannot split {what} {value!r}: {exc}") from None
    if isinstance(value, Sequence) and all(isinstance(a, str | os.PathLike) for a in value):
        return [os.fspath(a) for a in value]
    raise PipelineDefinitionError(f"stage {stage!r}: {what} must be a string or a list of strings, got {value!r}")


def _text(stage: str, what: str, value: object) -> str:
    """A non-empty string (or path)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise PipelineDefinitionError(f"stage {stage!r}: {what} must be a non-empty string, got {value!r}")
    return value


def _operand(stage: str, what: str, value: object) -> str:
    """A positional argument: a non-empty string that does not start with ``-``."""
    text = _text(stage, what, value)
    if text.startswith("-"):
        raise PipelineDefinitionError(f"stage {stage!r}: {what} {text!r} would be read as an option")
    return text


def _described(name: str, options: CommandOptions, default: str) -> CommandOptions:
    """``options`` with a default description; ``shell`` refused (language stages run argument lists)."""
    if "shell" in options:
        raise PipelineDefinitionError(
            f"stage {name!r}: language stages run an argument list, never a shell; remove shell="
        )
    if "description" not in options:
        options = {**options, "description": default}
    return options


# -- Go ---------------------------------------------------------------------


class GoModDownloadStage(CommandStage):
    """Download the Go module's dependencies: ``go mod download``.

    Args:
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid option.
    """

    def __init__(self, *, name: str = "go-mod-download", **options: Unpack[CommandOptions]) -> None:
        super().__init__(name, ["go", "mod", "download"], **_described(name, options, "Download Go modules"))


class GoBuildStage(CommandStage):
    """Build Go packages: ``go build [-o OUTPUT] [-ldflags LDFLAGS] PACKAGE``.

    Args:
        output: Where to write the binary (``-o``); Go's default without it.
        ldflags: Linker flags (``-ldflags``), one argument:
            ``"-s -w -X main.version=${VERSION}"``.
        package: The package pattern to build.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self,
        output: PathLike | None = None,
        ldflags: str | None = None,
        *,
        package: str = "./...",
        name: str = "go-build",
        **options: Unpack[CommandOptions],
    ) -> None:
        args = ["go", "build"]
        if output is not None:
            args += ["-o", _text(name, "output", output)]
        if ldflags is not None:
            args += ["-ldflags", _text(name, "ldflags", ldflags)]
        args.append(_operand(name, "package", package))
        super().__init__(name, args, **_described(name, options, "Build Go packages"))


class GoTestStage(CommandStage):
    """Test Go packages: ``go test ARGS PACKAGE``.

    Args:
        package: The package pattern to test.
        args: Extra ``go test`` flags (``["-race", "-count=1"]``); a string is
            split like a shell would.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self,
        package: str = "./...",
        args: str | Sequence[str] = (),
        *,
        name: str = "go-test",
        **options: Unpack[CommandOptions],
    ) -> None:
        command = ["go", "test", *_args(name, "args", args), _operand(name, "package", package)]
        super().__init__(name, command, **_described(name, options, "Test Go packages"))


# -- Python -----------------------------------------------------------------


class PipInstallStage(CommandStage):
    """Install Python requirements: ``PYTHON -m pip install -r REQUIREMENTS``.

    ``python`` defaults to the interpreter running pipekit (``sys.executable``),
    so packages land in the environment pipekit itself is installed in. Pass
    ``python="python3"`` (looked up on PATH) or a virtual environment's
    interpreter to install elsewhere.

    Args:
        requirements: A requirements file, or several (one ``-r`` each).
        python: The Python interpreter to run pip with.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self,
        requirements: PathLike | Sequence[PathLike] = "requirements.txt",
        *,
        python: PathLike = sys.executable,
        name: str = "pip-install",
        **options: Unpack[CommandOptions],
    ) -> None:
        files = [requirements] if isinstance(requirements, str | os.PathLike) else list(requirements)
        if not files:
            raise PipelineDefinitionError(f"stage {name!r}: requirements is empty")
        command = [_text(name, "python", python), "-m", "pip", "install"]
        for file in files:
            command += ["-r", _text(name, "requirements", file)]
        super().__init__(name, command, **_described(name, options, "Install Python requirements"))


class PytestStage(CommandStage):
    """Run the Python tests: ``PYTHON -m pytest ARGS``.

    ``python`` defaults to the interpreter running pipekit (``sys.executable``);
    see [`PipInstallStage`][pipekit.ci.PipInstallStage].

    Args:
        args: pytest arguments (``["-x", "tests/"]``); a string is split like a shell would.
        python: The Python interpreter to run pytest with.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self,
        args: str | Sequence[str] = (),
        *,
        python: PathLike = sys.executable,
        name: str = "pytest",
        **options: Unpack[CommandOptions],
    ) -> None:
        command = [_text(name, "python", python), "-m", "pytest", *_args(name, "args", args)]
        super().__init__(name, command, **_described(name, options, "Run the Python tests"))


# -- JavaScript -------------------------------------------------------------


class NpmInstallStage(CommandStage):
    """Install the JavaScript dependencies: ``npm ci`` (or ``npm install``).

    Args:
        ci: Run ``npm ci`` (a clean, exact install from the lock file, what
            CI wants); False runs ``npm install``.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid option.
    """

    def __init__(self, ci: bool = True, *, name: str = "npm-install", **options: Unpack[CommandOptions]) -> None:
        super().__init__(
            name, ["npm", "ci" if ci else "install"], **_described(name, options, "Install the JavaScript dependencies")
        )


class NpmBuildStage(CommandStage):
    """Run a ``package.json`` script: ``npm run SCRIPT``.

    Args:
        script: The script's name.
        name: The stage's name; ``npm-SCRIPT`` by default (``npm-build``).
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(self, script: str = "build", *, name: str | None = None, **options: Unpack[CommandOptions]) -> None:
        name = f"npm-{script}" if name is None else name
        command = ["npm", "run", _operand(name, "script", script)]
        super().__init__(name, command, **_described(name, options, f"Run the npm script {script!r}"))


# -- Rust -------------------------------------------------------------------


class CargoBuildStage(CommandStage):
    """Build the Rust crate: ``cargo build [--release]``.

    Args:
        release: Build with the release profile (optimised).
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid option.
    """

    def __init__(self, release: bool = False, *, name: str = "cargo-build", **options: Unpack[CommandOptions]) -> None:
        command = ["cargo", "build", *(["--release"] if release else [])]
        super().__init__(name, command, **_described(name, options, "Build the Rust crate"))


class CargoTestStage(CommandStage):
    """Test the Rust crate: ``cargo test ARGS``.

    Args:
        args: ``cargo test`` arguments (``["--all-features"]``); a string is
            split like a shell would.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self, args: str | Sequence[str] = (), *, name: str = "cargo-test", **options: Unpack[CommandOptions]
    ) -> None:
        command = ["cargo", "test", *_args(name, "args", args)]
        super().__init__(name, command, **_described(name, options, "Test the Rust crate"))


# -- Containers -------------------------------------------------------------


class DockerBuildStage(CommandStage):
    """Build a container image: ``docker build -t TAG -f DOCKERFILE CONTEXT``.

    Args:
        tag: The image's name and tag (``registry.example.com/app:${VERSION}``).
        dockerfile: The Dockerfile, relative to the working directory.
        context: The build context directory.
        name: The stage's name.
        **options: [`CommandStage`][pipekit.ci.CommandStage] options (``cwd``, ``env``, ``timeout``, ``retry``...).

    Raises:
        PipelineDefinitionError: For an invalid parameter or option.
    """

    def __init__(
        self,
        tag: str,
        dockerfile: PathLike = "Dockerfile",
        context: PathLike = ".",
        *,
        name: str = "docker-build",
        **options: Unpack[CommandOptions],
    ) -> None:
        command = [
            "docker",
            "build",
            "-t",
            _operand(name, "tag", tag),
            "-f",
            _text(name, "dockerfile", dockerfile),
            _operand(name, "context", context),
        ]
        super().__init__(name, command, **_described(name, options, "Build a container image"))

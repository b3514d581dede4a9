"""Pre-flight validators: required environment variables and tools (with minimum versions).

Attach them with [`Pipeline.with_validators`][pipekit.Pipeline.with_validators]:
they run before any stage (and in dry runs), and every problem they find is
reported at once.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from packaging.version import InvalidVersion, Version

from pipekit._errors import ValidationError
from pipekit.ci._process import run_process

if TYPE_CHECKING:
    from pipekit._context import StageContext

__all__ = ["EnvVarValidator", "Tool", "ToolValidator"]

#: The version pattern of a tool pipekit knows nothing about: the first dotted number.
GENERIC_VERSION_PATTERN = r"(\d+(?:\.\d+)+)"

#: How each well-known tool reports its version: (arguments, pattern whose group 1 is the version).
_KNOWN_TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "go": (("version",), r"go(\d+\.\d+(?:\.\d+)?)"),  # go version go1.21.3 linux/amd64
    "python": (("--version",), r"Python (\d+\.\d+(?:\.\d+)?)"),  # Python 3.11.4
    "node": (("--version",), r"v(\d+\.\d+\.\d+)"),  # v20.1.0
    "npm": (("--version",), r"(\d+\.\d+\.\d+)"),  # 10.2.4
    "cargo": (("--version",), r"cargo (\d+\.\d+\.\d+)"),  # cargo 1.75.0 (1d8b05cdd 2023-11-20)
    "rustc": (("--version",), r"rustc (\d+\.\d+\.\d+)"),  # rustc 1.75.0 (82e1608df 2023-12-21)
    "docker": (("--version",), r"version (\d+\.\d+\.\d+)"),  # Docker version 24.0.7, build afdd53b
    # kubectl 1.28+: "Client Version: v1.28.2"; older: 'version.Info{... GitVersion:"v1.21.0", ...}'
    "kubectl": (("version", "--client"), r"(?:Client Version: |GitVersion:\")v?(\d+\.\d+(?:\.\d+)?)"),
    "git": (("--version",), r"git version (\d+\.\d+(?:\.\d+)?)"),  # git version 2.43.0
    "pip": (("--version",), r"pip (\d+(?:\.\d+)+)"),  # pip 23.3.1 from /usr/lib/... (python 3.11)
}
_ALIASES = re.compile(r"(?P<tool>python|pip)3?(?:\.\d+)?")

#: The most lines kept from a version command's output (a version is near the start).
_MAX_LINES = 100
#: How much of an unexpected output a problem message quotes.
_QUOTE_LIMIT = 200
#: Seconds a timed-out version command gets between SIGTERM and SIGKILL.
_KILL_GRACE = 1.0


def _known(name: str) -> tuple[tuple[str, ...], str] | None:
    """The built-in defaults for the tool ``name`` (a path or ``.exe`` suffix allowed), if any."""
    base = os.path.basename(name)
    if base.lower().endswith(".exe"):
        base = base[:-4]
    if base in _KNOWN_TOOLS:
        return _KNOWN_TOOLS[base]
    alias = _ALIASES.fullmatch(base)
    return _KNOWN_TOOLS[alias["tool"]] if alias else None


def _default_args(tool: Tool) -> tuple[str, ...]:
    known = _known(tool.name)
    return known[0] if known else ("--version",)


def _default_pattern(tool: Tool) -> str:
    known = _known(tool.name)
    return known[1] if known else GENERIC_VERSION_PATTERN


def _to_args(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(a, str) for a in value):
        raise TypeError(f"Tool version_args must be a sequence of strings like ('--version',), got {value!r}")
    return tuple(value)


def _check_name(_inst: object, _attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Tool name must be a non-empty executable name, got {value!r}")


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."


@attrs.frozen(kw_only=True, repr=False)
class Tool:
    """A command-line tool a pipeline needs, optionally with a minimum version.

    Well-known tools (``go``, ``python``/``python3``, ``node``, ``npm``,
    ``cargo``, ``rustc``, ``docker``, ``kubectl``, ``git``, ``pip``) get the
    right version command and pattern by default: ``Tool("go",
    min_version="1.21")`` runs ``go version`` and reads ``1.21.3`` out of
    ``go version go1.21.3 linux/amd64``. Others run ``NAME --version`` and
    take the first dotted number. Versions are compared as
    [PEP 440](https://peps.python.org/pep-0440/) versions (``1.10`` is newer
    than ``1.9``; ``1.21.0`` satisfies ``1.21``).

    Args:
        name: The executable, looked up on PATH.
        min_version: The oldest acceptable version; None only requires the
            tool to be on PATH (it is then not run).
        version_args: The arguments that make the tool print its version.
        version_pattern: A regular expression searched in that output
            (standard output and error together); its first group is the
            version.

    Raises:
        ValueError: For an empty name, an invalid ``min_version``, or a
            ``version_pattern`` that does not compile or has no group.
        TypeError: If ``version_args`` is a string rather than a sequence of them.
    """

    name: str = attrs.field(kw_only=False, validator=_check_name)
    min_version: str | None = None
    version_args: tuple[str, ...] = attrs.field(
        default=attrs.Factory(_default_args, takes_self=True), converter=_to_args
    )
    version_pattern: str = attrs.field(default=attrs.Factory(_default_pattern, takes_self=True))
    _regex: re.Pattern[str] = attrs.field(init=False, eq=False)
    _minimum: Version | None = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.version_pattern, str):
            raise TypeError(f"Tool {self.name!r}: version_pattern must be a string, got {self.version_pattern!r}")
        try:
            regex = re.compile(self.version_pattern)
        except re.error as exc:
            raise ValueError(f"Tool {self.name!r}: invalid version_pattern {self.version_pattern!r}: {exc}") from None
        if regex.groups < 1:
            raise ValueError(
                f"Tool {self.name!r}: version_pattern {self.version_pattern!r} needs a group capturing the version, "
                r"like '(\d+(?:\.\d+)+)'"
            )
        minimum = None
        if self.min_version is not None:
            try:
                minimum = Version(self.min_version)
            except (InvalidVersion, TypeError):
                raise ValueError(
                    f"Tool {self.name!r}: min_version {self.min_version!r} is not a version like '1.21'"
                ) from None
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "_minimum", minimum)

    def __repr__(self) -> str:
        parts = [repr(self.name)]
        if self.min_version is not None:
            parts.append(f"min_version={self.min_version!r}")
        if self.version_args != _default_args(self):
            parts.append(f"version_args={self.version_args!r}")
        if self.version_pattern != _default_pattern(self):
            parts.append(f"version_pattern={self.version_pattern!r}")
        return f"Tool({', '.join(parts)})"

    @property
    def version_command(self) -> str:
        """The version command as a shell would show it (``go version``)."""
        return shlex.join([self.name, *self.version_args])

    def find_version(self, output: str) -> str | None:
        """Return the version ``version_pattern`` finds in ``output``, or None.

        Args:
            output: What the version command printed.

        Returns:
            The text of the pattern's first group at its first match.
        """
        match = self._regex.search(output)
        return match[1] if match and match[1] else None

    def check_version(self, version: str) -> str | None:
        """Say what is wrong with ``version`` for this tool, if anything.

        Args:
            version: A version found in the tool's output.

        Returns:
            None when it satisfies ``min_version`` (or there is none), else a
            one-line problem naming the tool.
        """
        if self._minimum is None:
            return None
        try:
            found = Version(version)
        except InvalidVersion:
            return f"tool {self.name!r}: {version!r} found in {self.version_command!r} output is not a version"
        if found < self._minimum:
            return f"tool {self.name!r} {version} is older than the required {self.min_version}"
        return None


def _to_names(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"EnvVarValidator takes a list of variable names, got the string {value!r}; use [{value!r}]")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name or "=" in name:
            raise ValueError(f"EnvVarValidator: {name!r} is not an environment variable name")
    return names


@attrs.frozen
class EnvVarValidator:
    """Requires environment variables to be set and non-empty.

    Every missing or empty variable is one problem
    (``environment variable 'DEPLOY_TOKEN' is not set``), all reported at
    once. Values are never shown, in problems or in the repr.

    Args:
        required: The variables' names.
        env: Where to look; ``os.environ`` as it is when the validator runs
            by default.

    Raises:
        TypeError: If ``required`` is a single string.
        ValueError: For something that cannot be a variable name.
    """

    required: tuple[str, ...] = attrs.field(converter=_to_names)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True, repr=False, eq=False)

    async def validate(self, ctx: StageContext) -> None:
        """Check every required variable.

        Args:
            ctx: The run's context (unused).

        Raises:
            ValidationError: Listing each missing or empty variable in ``errors``.
        """
        env = os.environ if self.env is None else self.env
        problems: list[ValidationError] = []
        for name in self.required:
            value = env.get(name)
            if value is None:
                problems.append(ValidationError(f"environment variable {name!r} is not set"))
            elif not value:
                problems.append(ValidationError(f"environment variable {name!r} is empty"))
        _raise_all(problems, "environment")


def _to_tools(value: Iterable[Tool | str]) -> tuple[Tool, ...]:
    if isinstance(value, str | Tool):
        raise TypeError(f"ToolValidator takes a list of tools, got {value!r}; use [{value!r}]")
    tools = []
    for tool in value:
        if isinstance(tool, str):
            tools.append(Tool(tool))
        elif isinstance(tool, Tool):
            tools.append(tool)
        else:
            raise TypeError(f"ToolValidator tools must be pipekit.ci.Tool objects or names, got {tool!r}")
    return tuple(tools)


def _check_timeout(_inst: object, _attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"ToolValidator timeout must be a positive number of seconds, got {value!r}")


@attrs.frozen
class ToolValidator:
    """Requires tools to be on PATH, each at least at its ``min_version``.

    All tools are checked concurrently. A tool without ``min_version`` only
    has to be on PATH (it is not run); the others run their version command
    (``go version``), which must exit with status 0 within ``timeout`` seconds
    (it is killed otherwise) and print a version that is new enough. Every
    problem of every tool is reported at once, in the order the tools were
    given.

    Args:
        tools: [`Tool`][pipekit.ci.Tool]s, or bare names for "on PATH, any version".
        path: The search path (``os.pathsep``-separated) to find the tools in,
            also the PATH their version commands run with; the ``PATH``
            environment variable as it is when the validator runs by default.
        timeout: Seconds each version command may take.

    Raises:
        TypeError: If ``tools`` is a single tool or holds something else.
        ValueError: For a timeout that is not a positive number.
    """

    tools: tuple[Tool, ...] = attrs.field(converter=_to_tools)
    path: str | None = attrs.field(default=None, kw_only=True)
    timeout: float = attrs.field(default=10.0, kw_only=True, validator=_check_timeout)

    async def validate(self, ctx: StageContext) -> None:
        """Check every tool, concurrently.

        Args:
            ctx: The run's context (unused).

        Raises:
            ValidationError: Listing each problem of each tool in ``errors``.
        """
        path = os.environ.get("PATH", os.defpath) if self.path is None else self.path
        found: list[str | None] = [None] * len(self.tools)

        async def check(i: int, tool: Tool) -> None:
            found[i] = await self._check(tool, path)

        async with anyio.create_task_group() as tg:
            for i, tool in enumerate(self.tools):
                tg.start_soon(check, i, tool)
        _raise_all([ValidationError(problem) for problem in found if problem is not None], "tool")

    async def _check(self, tool: Tool, path: str) -> str | None:
        """One tool's problem, or None."""
        executable = await anyio.to_thread.run_sync(lambda: shutil.which(tool.name, path=path))
        if executable is None:
            return f"tool {tool.name!r} is not on PATH"
        if tool.min_version is None:
            return None
        command = tool.version_command
        env = dict(os.environ)
        if self.path is not None:
            env["PATH"] = path
        lines: list[str] = []

        async def keep(_stream: str, line: str) -> None:
            if len(lines) < _MAX_LINES:
                lines.append(line)

        try:
            with anyio.move_on_after(self.timeout) as scope:
                returncode = await run_process(
                    [executable, *tool.version_args], cwd=None, env=env, on_line=keep, kill_grace=_KILL_GRACE
                )
        except OSError as exc:
            return f"tool {tool.name!r}: could not run {command!r}: {exc}"
        if scope.cancelled_caught:
            return f"tool {tool.name!r}: {command!r} did not finish within {self.timeout:g}s"
        output = "\n".join(lines)
        if returncode != 0:
            return f"tool {tool.name!r}: {command!r} exited with status {returncode}: {_shorten(output)!r}"
        version = tool.find_version(output)
        if version is None:
            return f"tool {tool.name!r}: could not find a version in {command!r} output: {_shorten(output)!r}"
        return tool.check_version(version)


def _raise_all(problems: list[ValidationError], what: str) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    raise ValidationError(f"{len(problems)} {what} problems: " + "; ".join(map(str, problems)), errors=problems)

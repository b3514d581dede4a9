"""`CommandStage`: a shell command as a stage, with the guarantees of any other stage."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
from opentelemetry import trace

from pipekit._context import StageContext
from pipekit._errors import PipelineDefinitionError, ValidationError
from pipekit._pipeline import _check_seconds as check_seconds
from pipekit._policy import RetryPolicy
from pipekit._stage import BaseStage

from ._errors import CommandError, CommandFailedError, CommandNotFoundError
from ._events import OutputLine
from ._process import Stream, Tail, run_process
from ._template import Masker, Secret, check_template, expand, expand_shell, references

__all__ = ["CommandResult", "CommandStage"]

#: The default size of the tail kept of each output stream: 1 MiB.
DEFAULT_TAIL_BYTES = 1024 * 1024
_FLUSH_BYTES = 64 * 1024

ATTR_COMMAND = "pipekit.ci.command"
ATTR_RETURNCODE = "pipekit.ci.returncode"


@attrs.frozen(kw_only=True)
class CommandResult:
    """What a command did: the output of a [`CommandStage`][pipekit.ci.CommandStage].

    Attributes:
        args: The arguments that ran (``["/bin/sh", "-c", script]`` for shell commands, the script reading
            referenced values from ``PIPEKIT_VAR_NAME`` environment variables), secrets masked.
        returncode: The exit status (negative: killed by that signal).
        stdout: The tail of its standard output (up to ``tail_bytes``), secrets masked.
        stderr: The tail of its standard error, likewise.
        duration: Seconds it ran.
        truncated: Whether older output was dropped from either tail.
    """

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    truncated: bool


def _check_command(stage: str, command: object, shell: bool, what: str) -> str | tuple[str, ...]:
    """The command as a shell string (``shell``) or an argument tuple; raises for anything else."""
    if isinstance(command, str):
        if not command.strip():
            raise PipelineDefinitionError(f"stage {stage!r}: {what} is empty")
        if shell:
            return command
        try:
            args = tuple(shlex.split(command))
        except ValueError as exc:
            raise PipelineDefinitionError(f"stage {stage!r}: cannot split {what} {command!r}: {exc}") from None
    elif isinstance(command, Sequence) and all(isinstance(a, str | os.PathLike) for a in command):
        args = tuple(os.fspath(a) for a in command)
        if shell:
            return shlex.join(args)
    else:
        raise PipelineDefinitionError(
            f"stage {stage!r}: {what} must be a string or a list of strings, got {type(command).__name__}"
        )
    if not args or not args[0]:
        raise PipelineDefinitionError(f"stage {stage!r}: {what} is empty")
    return args


def _check_env(stage: str, env: Mapping[str, str | Secret] | None) -> dict[str, str | Secret]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise PipelineDefinitionError(f"stage {stage!r}: env must be a mapping, got {type(env).__name__}")
    checked: dict[str, str | Secret] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key:
            raise PipelineDefinitionError(f"stage {stage!r}: invalid environment variable name {key!r}")
        if not isinstance(value, str | Secret):
            raise PipelineDefinitionError(
                f"stage {stage!r}: env[{key!r}] must be a string or pipekit.ci.Secret, got {type(value).__name__}"
            )
        checked[key] = value
    return checked


class CommandStage(BaseStage):
    """Run a command (``make test``, ``python -m build``...) as a stage.

    Its output is streamed line by line as it comes: into ``ctx.log``
    (``pipekit.ci.output``) and as [`OutputLine`][pipekit.ci.OutputLine]
    events. A bounded tail of each stream is kept for the result, and the
    whole log can go to a file. An exit status outside ``success_codes``
    raises [`CommandFailedError`][pipekit.ci.CommandFailedError].

    ``${NAME}`` in the command, ``cwd`` and ``env`` values is replaced by the
    pipeline's variable or request input of that name (input wins), ``$$`` by
    ``$``. Each value becomes part of one argument, never shell syntax: a
    ``shell=True`` script reads it from the environment variable
    ``PIPEKIT_VAR_NAME`` (``"${PIPEKIT_VAR_NAME}"``, quoted for where the
    reference stands), so the shell never parses it. An unknown name fails validation
    (so a dry run finds it). `Secret` values, in ``env`` or referenced, are
    masked as ``***`` in logs, events, span attributes, results and errors.

    A timeout or cancellation ends the command's whole process group:
    SIGTERM, then SIGKILL after ``kill_grace`` seconds. Processes a command
    leaves running when it exits are ended the same way. POSIX only.

    Args:
        name: The stage's name.
        command: A string (split like a shell would, with `shlex`) or a list
            of arguments; with ``shell=True`` a string for ``/bin/sh -c``.
        shell: Run through ``/bin/sh`` (pipes, globs, ``&&``).
        cwd: The working directory (the current one by default).
        env: Environment variables to set; values may be `Secret`.
        inherit_env: Start from the current environment (else from ``env`` alone).
        timeout: Seconds each attempt may take (``add_stage(timeout=...)`` wins).
        retry: The retry policy (``add_stage(retry=...)`` wins).
        success_codes: Exit statuses that count as success.
        rollback_command: A command run, with the same settings, to undo
            this stage when a later stage fails.
        description: What the stage does, for displays.
        tail_bytes: How much of each stream's end to keep in the result.
        log_file: Also append the whole (masked) output to this file.
        kill_grace: Seconds between SIGTERM and SIGKILL.

    Raises:
        PipelineDefinitionError: For an invalid option, naming it.
    """

    def __init__(
        self,
        name: str,
        command: str | Sequence[str | os.PathLike[str]],
        *,
        shell: bool = False,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str | Secret] | None = None,
        inherit_env: bool = True,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        success_codes: Sequence[int] = (0,),
        rollback_command: str | Sequence[str | os.PathLike[str]] | None = None,
        description: str = "",
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        log_file: str | os.PathLike[str] | None = None,
        kill_grace: float = 5.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineDefinitionError(f"a command stage needs a non-empty string name, got {name!r}")
        super().__init__(name)
        self.shell = bool(shell)
        self.command = _check_command(name, command, self.shell, "command")
        self.rollback_command = (
            None if rollback_command is None else _check_command(name, rollback_command, self.shell, "rollback_command")
        )
        self.cwd = None if cwd is None else os.fspath(cwd)
        self.env = _check_env(name, env)
        self.inherit_env = bool(inherit_env)
        self.timeout = check_seconds(f"stage {name!r}: timeout", timeout)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise PipelineDefinitionError(f"stage {name!r}: retry must be a pipekit.RetryPolicy, got {retry!r}")
        self.retry = retry
        if isinstance(success_codes, int) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in success_codes
        ):
            raise PipelineDefinitionError(f"stage {name!r}: success_codes must be a list of integers")
        if not success_codes:
            raise PipelineDefinitionError(f"stage {name!r}: success_codes is empty (no exit status would succeed)")
        self.success_codes = frozenset(success_codes)
        self.description = description
        if not isinstance(tail_bytes, int) or isinstance(tail_bytes, bool) or tail_bytes < 1:
            raise PipelineDefinitionError(f"stage {name!r}: tail_bytes must be an integer >= 1, got {tail_bytes!r}")
        self.tail_bytes = tail_bytes
        self.log_file = None if log_file is None else Path(log_file)
        self.kill_grace = check_seconds(f"stage {name!r}: kill_grace", kill_grace) or 5.0
        # Without a rollback command there is nothing to undo: say so to the runner.
        self._pipekit_rolls_back = self.rollback_command is not None

    # -- templates ----------------------------------------------------------

    def _templates(self) -> list[tuple[str, str]]:
        """Every text that may hold references, with where it is."""
        found: list[tuple[str, str]] = []
        for what, command in (("command", self.command), ("rollback_command", self.rollback_command)):
            if command is not None:
                found.extend((what, part) for part in ([command] if isinstance(command, str) else command))
        if self.cwd is not None:
            found.append(("cwd", self.cwd))
        found.extend((f"env[{key!r}]", value) for key, value in self.env.items() if isinstance(value, str))
        return found

    def validate(self, ctx: StageContext) -> None:
        """Check ``${NAME}`` references and, in dry runs, that the executables exist.

        Raises:
            ValidationError: Listing every problem.
        """
        known = {**ctx.variables, **ctx.input}
        problems: list[str] = []
        for where, text in self._templates():
            problems.extend(f"{where}: {p}" for p in check_template(text))
            problems.extend(
                f"{where}: unknown variable ${{{n}}}"
                for n in references(text)
                if n and n not in known and n.isidentifier()
            )
        if ctx.dry_run:
            problems.extend(self._missing_executables(known))
        if problems:
            errors = [ValidationError(f"stage {self.name!r}: {p}", stage=self.name) for p in problems]
            raise ValidationError("; ".join(map(str, errors)), stage=self.name, errors=errors)

    def _missing_executables(self, known: Mapping[str, Any]) -> list[str]:
        """The executables that cannot be found, checked as far as unknown references allow.

        An unknown reference is reported on its own; it only hides the checks
        it makes impossible (an unknown executable name, ``PATH`` or ``cwd``),
        so a dry run lists every missing tool along with every unknown name.
        """
        env = dict(os.environ) if self.inherit_env else {}
        for key, value in self.env.items():
            try:
                env[key] = value.reveal() if isinstance(value, Secret) else expand(value, known)[0]
            except KeyError:
                env.pop(key, None)
                if key == "PATH":
                    return []
        try:
            cwd = self._cwd(known, [])
        except KeyError:
            return []
        missing: list[str] = []
        for what, command in (("command", self.command), ("rollback_command", self.rollback_command)):
            if isinstance(command, tuple):
                try:
                    executable = expand(command[0], known)[0]
                except KeyError:
                    continue
                if _which(executable, env, cwd) is None:
                    missing.append(f"{what}: {_not_found(executable)}")
        return missing

    def _environment(self, values: Mapping[str, Any], secrets: list[str]) -> dict[str, str]:
        env = dict(os.environ) if self.inherit_env else {}
        for key, value in self.env.items():
            if isinstance(value, Secret):
                env[key] = value.reveal()
                secrets.append(value.reveal())
            else:
                env[key], found = expand(value, values)
                secrets.extend(found)
        return env

    def _cwd(self, values: Mapping[str, Any], secrets: list[str]) -> str | None:
        if self.cwd is None:
            return None
        cwd, found = expand(self.cwd, values)
        secrets.extend(found)
        return cwd

    # -- running ------------------------------------------------------------

    async def execute(self, ctx: StageContext) -> CommandResult:
        """Run the command.

        Raises:
            CommandFailedError: If it exits with a status outside ``success_codes``.
            CommandNotFoundError: If its executable does not exist.
        """
        return await self.run(ctx)

    async def rollback(self, ctx: StageContext) -> None:
        """Run the rollback command, if there is one.

        Raises:
            CommandFailedError: If it fails.
        """
        if self.rollback_command is not None:
            await self.run(ctx, self.rollback_command)

    async def run(
        self, ctx: StageContext, command: str | Sequence[str | os.PathLike[str]] | None = None
    ) -> CommandResult:
        """Run ``command`` (this stage's own by default) with this stage's settings.

        Other stages reuse it to run several commands as one stage.

        Raises:
            CommandFailedError: If it exits with a status outside ``success_codes``.
            CommandNotFoundError: If its executable does not exist.
            CommandError: If the working directory does not exist.
        """
        template = self.command if command is None else _check_command(self.name, command, self.shell, "command")
        values = {**ctx.variables, **ctx.input}
        secrets: list[str] = [v.reveal() for v in values.values() if isinstance(v, Secret)]
        script_env: dict[str, str] = {}
        try:
            if isinstance(template, str):
                # The script reads referenced values from the environment: the shell never parses them.
                script, script_env, found = expand_shell(template, values)
                secrets.extend(found)
                argv: list[str] = ["/bin/sh", "-c", script]
            else:
                argv = []
                for part in template:
                    text, found = expand(part, values)
                    argv.append(text)
                    secrets.extend(found)
        except KeyError as exc:
            raise CommandError(f"unknown variable ${{{exc.args[0]}}} in command") from None
        # Inheriting the environment unchanged needs no copy of it (the common case).
        env = (
            None
            if self.inherit_env and not self.env and not script_env
            else self._environment(values, secrets) | script_env
        )
        cwd = self._cwd(values, secrets)
        mask = Masker(secrets)
        shown = tuple(mask(a) for a in argv)
        if cwd is not None and not _is_dir(cwd):
            raise CommandError(f"working directory {mask(cwd)!r} does not exist", command=shown)
        executable = _which(argv[0], os.environ if env is None else env, cwd)
        if executable is None:
            raise CommandNotFoundError(_not_found(mask(argv[0])), command=shown)

        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(ATTR_COMMAND, shlex.join(shown))
        out, err = Tail(self.tail_bytes), Tail(self.tail_bytes)
        log = ctx.log
        sink = None
        if self.log_file is not None:
            sink = _LogFile(self.log_file, shlex.join(shown))
            try:
                await sink.open()
            except OSError as exc:
                raise CommandError(
                    f"cannot write the log file {os.fspath(self.log_file)!r}: {exc.strerror or exc}", command=shown
                ) from None

        async def on_line(stream: Stream, line: str) -> None:
            if mask:
                line = mask(line)
            (out if stream == "stdout" else err).add(line)
            log.info("pipekit.ci.output", stream=stream, line=line)
            await ctx.emit(OutputLine, stream=stream, line=line)
            if sink is not None:
                await sink.write(line)

        t0 = anyio.current_time()
        try:
            returncode = await run_process(
                [executable, *argv[1:]], cwd=cwd, env=env, on_line=on_line, kill_grace=self.kill_grace
            )
        except PermissionError as exc:
            raise CommandNotFoundError(f"{mask(argv[0])!r} is not executable ({exc.strerror})", command=shown) from None
        except FileNotFoundError:  # the file is there (it was found): the interpreter of its #! line is not
            raise CommandNotFoundError(
                f"{mask(argv[0])!r} could not be started: the interpreter its #! line names does not exist",
                command=shown,
            ) from None
        except OSError as exc:  # ENOEXEC: not a program this system runs (no #! line, another architecture)
            error = CommandNotFoundError if exc.errno == errno.ENOEXEC else CommandError
            raise error(f"{mask(argv[0])!r} could not be started: {exc.strerror or exc}", command=shown) from None
        finally:
            if sink is not None:
                await sink.aclose()
        duration = anyio.current_time() - t0
        if span.is_recording():
            span.set_attribute(ATTR_RETURNCODE, returncode)
        result = CommandResult(
            args=shown,
            returncode=returncode,
            stdout=out.text(),
            stderr=err.text(),
            duration=duration,
            truncated=out.truncated or err.truncated,
        )
        if returncode not in self.success_codes:
            raise CommandFailedError(
                _failure_message(shown, returncode, result.stderr),
                command=shown,
                returncode=returncode,
                stderr=result.stderr,
            )
        if sink is not None and sink.error is not None:
            problem = sink.error.strerror or sink.error
            raise CommandError(f"cannot write the log file {os.fspath(sink.path)!r}: {problem}", command=shown)
        return result

    def __repr__(self) -> str:
        command = self.command if isinstance(self.command, str) else shlex.join(self.command)
        return f"<{type(self).__name__} {self.name!r}: {command!r}>"


def _is_dir(path: str) -> bool:
    return Path(path).is_dir()


def _not_found(executable: str) -> str:
    if os.sep in executable:
        return f"executable {executable!r} does not exist"
    return f"executable {executable!r} not found on PATH"


def _which(executable: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """Where ``executable`` is (an absolute path), searched like the process would be (its PATH, its cwd).

    Absolute, because the process starts in ``cwd``: a relative path found
    from here would be resolved a second time from there.
    """
    if os.sep in executable:
        path = Path(cwd or ".") / executable
        return str(path.absolute()) if path.is_file() else None
    found = shutil.which(executable, path=env.get("PATH", os.defpath))
    return None if found is None else os.path.abspath(found)


def _shown(args: tuple[str, ...]) -> str:
    """A command as a message shows it: a shell script by its first line, everything cut at 120 characters."""
    if len(args) == 3 and args[1] == "-c" and os.path.basename(args[0]) == "sh":
        lines = args[2].strip().splitlines() or [""]
        command = lines[0] + (" ..." if len(lines) > 1 else "")
    else:
        command = shlex.join(args)
    return command if len(command) <= 120 else command[:117] + "..."


def _failure_message(args: tuple[str, ...], returncode: int, stderr: str) -> str:
    command = _shown(args)
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if len(last) > 300:
        last = last[:297] + "..."
    return f"command {command!r} {how}" + (f"; stderr ends with: {last}" if last else "")


class _LogFile:
    """Appends a command's output to a file, in chunks written from a worker thread.

    A failed write does not interrupt the command: the file gets nothing more,
    and ``error`` says why (the stage fails with it once the command ends).
    """

    __slots__ = ("_chunks", "_file", "_size", "error", "path")

    def __init__(self, path: Path, command: str) -> None:
        self.path = path
        self.error: OSError | None = None
        self._chunks: list[str] = [f"$ {command}\n"]
        self._size = 0
        self._file: Any = None

    async def open(self) -> None:
        """Create the file's directory and open the file for appending (before the command starts).

        Raises:
            OSError: If it cannot be.
        """

        def create() -> None:
            # A file in the way: opening says "Not a directory", clearer than mkdir's "File exists".
            with contextlib.suppress(FileExistsError):
                self.path.parent.mkdir(parents=True, exist_ok=True)

        await anyio.to_thread.run_sync(create)
        self._file = await anyio.open_file(self.path, "a", encoding="utf-8")

    async def write(self, line: str) -> None:
        """Append ``line`` (written once enough has gathered)."""
        if self.error is not None:
            return
        self._chunks.append(line + "\n")
        self._size += len(line) + 1
        if self._size >= _FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        text, self._chunks, self._size = "".join(self._chunks), [], 0
        if self.error is None:
            try:
                await self._file.write(text)
            except OSError as exc:
                self.error = exc

    async def aclose(self) -> None:
        """Write what is buffered and close the file (shielded: output is never lost)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._flush()
            try:
                await self._file.aclose()
            except OSError as exc:  # the last buffered write failed
                self.error = self.error or exc

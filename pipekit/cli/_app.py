"""The ``pipekit`` command: run, validate, list, show, retry and count pipeline runs.

Exit statuses: 0 the run succeeded (or the command did what it was asked),
1 the run failed or timed out, a validation found problems, or the run
history cannot be used; 2 the pipeline file or the command line is wrong
(nothing ran, nothing was written); 130 interrupted by Ctrl-C (143 by
SIGTERM) after the run was cancelled and rolled back.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar, cast

import anyio
import anyio.abc
import attrs
import structlog
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import pipekit as pk
from pipekit.store import (
    DEFAULT_PATH,
    PipelineStats,
    RunRecord,
    RunRecorder,
    SqliteStore,
    StoreError,
)

from ._display import (
    LOOKS,
    RUN_LOOKS,
    Display,
    JsonDisplay,
    LiveDisplay,
    PlainDisplay,
    RunView,
    iso,
    seconds,
)
from ._load import LoadedPipeline, LoadError, load_definition, load_pipeline, parse_inputs

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "app", "main"]

T = TypeVar("T")

#: The run succeeded; the command did what it was asked.
EXIT_OK: Final = 0
#: The run failed or timed out, validation found problems, or the run history cannot be used.
EXIT_FAILED: Final = 1
#: The pipeline (file) or the command line is wrong: nothing ran.
EXIT_USAGE: Final = 2
#: Interrupted by Ctrl-C (SIGINT); the run was cancelled and rolled back.
EXIT_INTERRUPTED: Final = 130
#: Interrupted by SIGTERM; likewise.
EXIT_TERMINATED: Final = 143

#: The width of tables written elsewhere than to a terminal (unless ``COLUMNS`` says otherwise).
PLAIN_WIDTH: Final = 200
#: Seconds between redraws of the live display.
REFRESH_INTERVAL: Final = 0.2
#: Metadata keys of the requests the command makes.
TRIGGER, DEFINITION, SOURCE, RETRY_OF = "pipekit.trigger", "pipekit.definition", "pipekit.source", "pipekit.retry_of"

app = typer.Typer(
    name="pipekit",
    help="Run pipelines and look at their history.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class CommandError(pk.PipekitError):
    """The command cannot do what it was asked; ``exit_code`` says how it ends.

    Args:
        message: What is wrong (one line per problem).
        exit_code: The exit status.
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- plumbing -------------------------------------------------------------------------


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


#: While a command given ``--json`` runs: the fields of the JSON document its errors are printed as.
_ERROR_DOCUMENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "pipekit_cli_error_document", default=None
)
F = TypeVar("F", bound=Callable[..., None])


def _json_errors(**fields: Any) -> Callable[[F], F]:
    """Make a command given ``--json`` print its errors as a JSON document on stdout too (they stay on stderr).

    The document names the command's ``target`` as ``source``, when it has one.

    Args:
        fields: More fields of the document (``valid=False`` for ``validate``,
            whose document then also lists the errors as ``problems``).
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            source = {"source": kwargs["target"]} if "target" in kwargs else {}
            token = _ERROR_DOCUMENT.set({**source, **fields} if kwargs.get("as_json") else None)
            try:
                command(*args, **kwargs)
            finally:
                _ERROR_DOCUMENT.reset(token)

        return cast(F, wrapper)

    return decorate


def _exit_with(lines: list[str], exit_code: int) -> NoReturn:
    """End the command; with ``--json``, after printing ``{"ok": false, "error": ..., "errors": [...], ...}``."""
    fields = _ERROR_DOCUMENT.get()
    if fields is not None:
        document = {**fields, "ok": False, "error": lines[0], "errors": lines, "exit_code": exit_code}
        if fields.get("valid") is False:
            document["problems"] = lines
        typer.echo(json.dumps(document, indent=2))
    raise typer.Exit(exit_code)


def _fail(message: str, exit_code: int) -> NoReturn:
    lines = message.splitlines() or [""]
    for line in lines:
        _stderr(f"pipekit: error: {line}")
    _exit_with(lines, exit_code)


def _interrupted() -> NoReturn:
    _stderr("pipekit: interrupted")
    _exit_with(["interrupted"], EXIT_INTERRUPTED)


def _leaf(error: BaseException) -> BaseException:
    """The one exception a chain of single-member exception groups wraps (task groups wrap)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@contextlib.contextmanager
def _logs(level: str) -> Iterator[None]:
    """Send pipekit's structlog events of ``level`` and above to stderr while the command runs.

    The display shows what happens; the logs would repeat it on stdout (structlog's default).
    The previous configuration is restored afterwards.
    """
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


def _call(function: Callable[..., Awaitable[T]], *args: Any, backend: str, log_level: str = "error") -> T:
    """Run ``function`` in an event loop; errors the user can act on end the command with one line each."""
    try:
        with _logs(log_level):
            return anyio.run(function, *args, backend=backend)
    except (Exception, BaseExceptionGroup) as exc:
        error = _leaf(exc)
        if isinstance(error, KeyboardInterrupt):
            _interrupted()
        if isinstance(error, LoadError):
            _fail(str(error), EXIT_USAGE)
        if isinstance(error, CommandError):
            _fail(str(error), error.exit_code)
        if isinstance(error, StoreError | pk.PipekitError):
            _fail(str(error), EXIT_FAILED)
        raise
    except KeyboardInterrupt:  # before the run started (or after it ended): nothing to cancel
        _interrupted()


def _console() -> Console:
    """A console on stdout; elsewhere than a terminal, lines are not wrapped at 80 columns (CI logs are wide)."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PLAIN_WIDTH
    return console


def _load(target: str) -> LoadedPipeline:
    try:
        return load_pipeline(target)
    except LoadError as exc:
        _fail(str(exc), EXIT_USAGE)


def _inputs(items: Sequence[str] | None) -> dict[str, str]:
    try:
        return parse_inputs(items or ())
    except LoadError as exc:
        _fail(str(exc), EXIT_USAGE)


def open_store(path: Path) -> SqliteStore:
    """The run history at ``path``, to enter with ``async with`` (the store's defaults: locks retried ~7 s)."""
    return SqliteStore(path)


def _existing(db: Path) -> Path:
    """``db``, which a command that only reads the history needs to exist (so that it never creates one)."""
    if not db.exists():
        raise CommandError(f"no run history at {db} (nothing recorded there yet; --db chooses another)")
    return db


# -- running ------------------------------------------------------------------------


@attrs.define(eq=False)
class _Outcome:
    """What became of one run the command started."""

    response: pk.PipelineResponse | None = None
    run_id: str | None = None
    signal: int | None = None
    store_error: StoreError | None = None


@attrs.frozen(kw_only=True)
class _Job:
    """One run for the command to start, show and record."""

    loaded: LoadedPipeline
    request: pk.PipelineRequest
    db: Path | None
    display: Display
    retry_of: str | None = None
    restored: tuple[str, ...] = ()


async def _follow(handle: pk.ExecutionHandle, display: Display) -> pk.PipelineResponse:
    async def redraw() -> None:
        while True:
            await anyio.sleep(REFRESH_INTERVAL)
            display.tick()

    display.start()
    try:
        async with anyio.create_task_group() as tg:
            if isinstance(display, LiveDisplay):
                tg.start_soon(redraw)
            async for event in handle.events():
                display.event(event)
            response = await handle.wait()
            tg.cancel_scope.cancel()
    finally:
        display.stop()
    return response


async def _on_signals(
    signals: AsyncIterator[int],
    handle: pk.ExecutionHandle,
    display: Display,
    outcome: _Outcome,
    tg: anyio.abc.TaskGroup,
) -> None:
    async for signum in signals:
        if outcome.signal is None:
            outcome.signal = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            display.note(f"{name}: cancelling the run; waiting for its rollback to finish")
            if isinstance(display, JsonDisplay):
                display.interrupted = True
            tg.start_soon(handle.cancel)
        else:
            display.note("still rolling back; the command ends when the rollback has finished")


async def _execute(job: _Job) -> _Outcome:
    outcome = _Outcome()
    recorder: RunRecorder | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            hooks: list[pk.Hook] = []
            if job.db is not None:
                store = await stack.enter_async_context(open_store(job.db))
                if not job.request.options.dry_run:
                    await store.check_writable()  # a locked database stops the run before anything runs
                recorder = await stack.enter_async_context(
                    store.recorder(
                        definition=job.loaded.definition,
                        trigger="retry" if job.retry_of else "cli",
                        retry_of=job.retry_of,
                    )
                )
                hooks.append(recorder)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with pk.Engine(hooks=hooks, max_concurrent=1) as engine:
                    handle = await engine.submit(job.loaded.pipeline, job.request)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_on_signals, signals, handle, job.display, outcome, tg)
                        outcome.response = await _follow(handle, job.display)
                        tg.cancel_scope.cancel()
    except (StoreError, BaseExceptionGroup) as exc:
        error = _leaf(exc)
        if outcome.response is None or not isinstance(error, StoreError):
            raise
        outcome.store_error = error  # the run ran; its history could not be written
    if recorder is not None:
        outcome.run_id = recorder.run_ids.get(job.request.id)
    return outcome


def _finish(job: _Job, outcome: _Outcome) -> int:
    response = outcome.response
    assert response is not None
    notes: list[str] = []
    if outcome.run_id is not None and outcome.store_error is None:
        notes.append(f"run {outcome.run_id} recorded in {job.db}")
    if job.retry_of is not None:
        restored = f" (restored: {', '.join(job.restored)})" if job.restored else ""
        notes.append(f"run {outcome.run_id or '(not recorded)'} retries run {job.retry_of}{restored}")
    job.display.finish(response, run_id=None if outcome.store_error else outcome.run_id, notes=notes)
    if outcome.store_error is not None:
        _stderr(f"pipekit: error: the run was not recorded: {outcome.store_error}")
    if outcome.signal is not None:
        return EXIT_INTERRUPTED if outcome.signal == signal.SIGINT else EXIT_TERMINATED
    if outcome.store_error is not None or not response.ok:
        return EXIT_FAILED
    return EXIT_OK


def _display(*, as_json: bool, plain: bool, pipeline: pk.Pipeline, retry_of: str | None = None) -> Display:
    if as_json:
        return JsonDisplay(retry_of=retry_of)
    console = _console()
    if plain or not console.is_terminal or console.is_dumb_terminal:
        return PlainDisplay()
    return LiveDisplay(console, RunView(pipeline))


def _problems(error: BaseException | None) -> list[str]:
    """Every problem a dry run found, one line each (aggregated validation errors flattened)."""
    if error is None:
        return []
    if isinstance(error, pk.ValidationError) and error.errors:
        return [line for problem in error.errors for line in _problems(problem)]
    lines = str(error).strip().splitlines()
    return [lines[0] if lines else type(error).__name__]


async def _dry_run(pipeline: pk.Pipeline, request: pk.PipelineRequest) -> pk.PipelineResponse:
    return await pipeline.execute(request)


# -- options shared by several commands ----------------------------------------------

DbOption = Annotated[
    Path,
    typer.Option("--db", envvar="PIPEKIT_DB", help="The run history (a SQLite file).", show_default=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document (for machines).")]
PlainOption = Annotated[
    bool, typer.Option("--plain", help="One plain line per event, even on a terminal (the default elsewhere).")
]
InputOption = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        "-i",
        metavar="KEY=VALUE",
        help="A request input value (repeatable); KEY=@FILE reads the value from FILE.",
    ),
]
ParallelOption = Annotated[
    int | None, typer.Option("--parallel", "-p", min=1, metavar="N", help="Run at most N stages at once.")
]
BackendOption = Annotated[str, typer.Option("--backend", hidden=True, help="anyio backend: asyncio or trio.")]


class LogLevel(enum.StrEnum):
    """The ``--log-level`` choices."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class RunState(enum.StrEnum):
    """The ``--status`` choices of ``pipekit runs`` (the states a recorded run can be in)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


LogLevelOption = Annotated[
    LogLevel,
    typer.Option("--log-level", help="Also print pipekit's log events of this level and above to stderr."),
]
DEFAULT_DB = Path(DEFAULT_PATH)


# -- commands -----------------------------------------------------------------------


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pipekit {pk.__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Run pipelines and look at their history."""


@app.command("run")
@_json_errors()
def run_command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE", help="A pipeline file (.yaml, .yml, .json), a Python file (.py) or module:attribute."
        ),
    ],
    *,
    inputs: InputOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate everything, run nothing, record nothing.")
    ] = False,
    parallel: ParallelOption = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0.001, metavar="SECONDS", help="Seconds the whole run may take.")
    ] = None,
    db: DbOption = DEFAULT_DB,
    no_db: Annotated[bool, typer.Option("--no-db", help="Do not record the run.")] = False,
    as_json: JsonOption = False,
    plain: PlainOption = False,
    log_level: LogLevelOption = LogLevel.ERROR,
    backend: BackendOption = "asyncio",
) -> None:
    """Run a pipeline, showing its progress, and record it in the run history.

    Exits 0 when the run succeeded, 1 when it failed, 2 when the file is
    invalid, 130 when interrupted (the run is cancelled and rolled back first).
    """
    values = _inputs(inputs)
    loaded = _load(target)
    options = pk.RequestOptions(dry_run=dry_run, max_parallel=parallel, timeout=timeout)
    metadata = {TRIGGER: "cli", SOURCE: loaded.source}
    if loaded.definition is not None:
        metadata[DEFINITION] = loaded.definition
    request = pk.PipelineRequest(input=values, options=options, metadata=metadata)
    if dry_run:
        response = _call(_dry_run, loaded.pipeline, request, backend=backend, log_level=log_level)
        raise typer.Exit(_report_problems(target, loaded.pipeline, response, as_json=as_json))
    job = _Job(
        loaded=loaded,
        request=request,
        db=None if no_db else db,
        display=_display(as_json=as_json, plain=plain, pipeline=loaded.pipeline),
    )
    outcome = _call(_execute, job, backend=backend, log_level=log_level)
    raise typer.Exit(_finish(job, outcome))


def _report_problems(target: str, pipeline: pk.Pipeline, response: pk.PipelineResponse, *, as_json: bool) -> int:
    problems = _problems(response.error)
    if as_json:
        document = {"pipeline": pipeline.name, "source": target, "valid": not problems, "problems": problems}
        typer.echo(json.dumps(document, indent=2))
    elif problems:
        for problem in problems:
            typer.echo(f"{target}: {problem}")
        typer.echo(f"{len(problems)} problem{'' if len(problems) == 1 else 's'} found in pipeline {pipeline.name!r}")
    else:
        count = len(pipeline.stage_names)
        typer.echo(f"{target}: pipeline {pipeline.name!r} is valid ({count} stage{'' if count == 1 else 's'})")
    return EXIT_FAILED if problems else EXIT_OK


@app.command("validate")
@_json_errors(pipeline=None, valid=False)
def validate_command(
    target: Annotated[
        str, typer.Argument(metavar="FILE", help="A pipeline file, a Python file (.py) or module:attribute.")
    ],
    *,
    inputs: InputOption = None,
    as_json: JsonOption = False,
    backend: BackendOption = "asyncio",
) -> None:
    """Check a pipeline without running it: its structure, its validators and each stage.

    Every problem is printed, one per line. Exits 0 when there is none, 1 when
    there are some, 2 when the file itself is invalid.
    """
    values = _inputs(inputs)
    loaded = _load(target)
    request = pk.PipelineRequest(input=values, options=pk.RequestOptions(dry_run=True))
    response = _call(_dry_run, loaded.pipeline, request, backend=backend)
    raise typer.Exit(_report_problems(target, loaded.pipeline, response, as_json=as_json))


def _as_json(record: RunRecord | PipelineStats) -> dict[str, Any]:
    """``record`` as JSON data: times as ISO 8601 text, the definition text left out."""

    def plain(_inst: object, _field: object, value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, Mapping) and not isinstance(value, dict):
            return dict(value)
        return value

    data = attrs.asdict(record, value_serializer=plain)
    data.pop("definition", None)
    return data


def _status_text(status: str) -> Text:
    symbol, style, words = LOOKS.get(status, ("?", "", status))
    return Text(f"{symbol} {words}", style=style)


@app.command("runs")
@_json_errors()
def runs_command(
    *,
    pipeline: Annotated[str | None, typer.Option("--pipeline", help="Only this pipeline's runs.")] = None,
    status: Annotated[RunState | None, typer.Option("--status", help="Only runs in this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most this many (newest first).")] = 20,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
    backend: BackendOption = "asyncio",
) -> None:
    """List recorded runs, newest first."""

    async def main() -> tuple[tuple[RunRecord, ...], int]:
        async with open_store(_existing(db)) as store:
            page = await store.list_runs(
                pipeline=pipeline, status=None if status is None else status.value, limit=limit
            )
            return page.runs, page.total

    if not db.exists() and not as_json:
        typer.echo(f"no runs recorded in {db}")
        return
    runs, total = _call(main, backend=backend) if db.exists() else ((), 0)
    if as_json:
        typer.echo(json.dumps({"total": total, "runs": [_as_json(r) for r in runs]}, indent=2))
        return
    if not runs:
        typer.echo(f"no runs recorded in {db}" + (" match" if pipeline or status else ""))
        return
    table = Table(title=Text(f"{len(runs)} of {total} runs in {db}"), title_justify="left")
    for column in ("run", "pipeline", "status", "trigger", "started", "time"):
        table.add_column(column, no_wrap=column != "pipeline", justify="right" if column == "time" else "left")
    for record in runs:
        trigger = record.trigger + (f" of {record.retry_of[:12]}" if record.retry_of else "")
        table.add_row(
            record.id[:12],
            Text(record.pipeline),
            _status_text(record.status),
            Text(trigger),
            iso(record.started_at),
            seconds(record.duration),
        )
    _console().print(table)


@app.command("show")
@_json_errors()
def show_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="A run's id, or the start of it.")],
    *,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
    backend: BackendOption = "asyncio",
) -> None:
    """Show one recorded run: its stages, their errors and rollbacks, and the end of each stage's log."""

    async def main() -> RunRecord:
        async with open_store(_existing(db)) as store:
            return await store.get_run(run_id)

    record = _call(main, backend=backend)
    if as_json:
        typer.echo(json.dumps(_as_json(record), indent=2))
        return
    console = _console()
    style, words = RUN_LOOKS.get(record.status, ("", record.status))
    header = Text(f"run {record.id}  ", style="bold")
    header.append(f"pipeline {record.pipeline!r}  ")
    header.append(words, style=style)
    console.print(header)
    facts = [
        ("started", iso(record.started_at)),
        ("duration", seconds(record.duration)),
        ("trigger", record.trigger),
        ("retry of", record.retry_of),
        ("input", json.dumps(dict(record.input)) if record.input else None),
        ("error", record.error),
        ("host", f"{record.host} (pid {record.pid})" if record.host else None),
    ]
    for label, value in facts:
        if value:
            console.print(Text(f"  {label + ':':<10}{value}"))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("stage", "status", "attempts", "time", "rollback", "error / reason"):
        table.add_column(column, no_wrap=column not in ("error / reason",), overflow="fold")
    for stage in record.stages:
        rollback = stage.rollback_status.replace("_", " ") if stage.rollback_status else ""
        if stage.rollback_error:
            rollback += f": {stage.rollback_error}"
        table.add_row(
            Text(stage.stage),
            _status_text(stage.status),
            str(stage.attempts),
            seconds(stage.duration),
            Text(rollback),
            Text(stage.error or stage.reason or ""),
        )
    console.print()
    console.print(table)
    for stage in record.stages:
        if stage.log_tail:
            console.print()
            lines = len(stage.log_tail)
            heading = f"── {stage.stage}: last {lines} line{'' if lines == 1 else 's'} of output ──"
            console.print(Text(heading, style="bold"))
            for line in stage.log_tail:
                console.print(Text(line), no_wrap=True, overflow="ignore", crop=False)


def _flaky(stats: PipelineStats) -> str:
    return ", ".join(f"{stage} ({retries} retr{'y' if retries == 1 else 'ies'})" for stage, retries in stats.flakiest)


@app.command("stats")
@_json_errors()
def stats_command(
    pipeline: Annotated[str | None, typer.Argument(metavar="[PIPELINE]", help="Only this pipeline.")] = None,
    *,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
    backend: BackendOption = "asyncio",
) -> None:
    """Count finished runs per pipeline: success rate, durations (mean, p50, p95), flakiest stages."""

    async def main() -> list[PipelineStats]:
        async with open_store(_existing(db)) as store:
            return await store.stats(pipeline=pipeline)

    stats = _call(main, backend=backend) if db.exists() else []
    if as_json:
        typer.echo(json.dumps([_as_json(s) for s in stats], indent=2))
        return
    if not stats:
        typer.echo(f"no finished runs{f' of pipeline {pipeline!r}' if pipeline else ''} in {db}")
        return
    table = Table(title=Text(f"runs in {db}"), title_justify="left")
    for column in ("pipeline", "runs", "succeeded", "success", "mean", "p50", "p95", "flakiest stages"):
        table.add_column(column, justify="left" if column in ("pipeline", "flakiest stages") else "right")
    for entry in stats:
        table.add_row(
            Text(entry.pipeline),
            str(entry.runs),
            str(entry.succeeded),
            f"{entry.success_rate:.0%}",
            seconds(entry.mean_duration),
            seconds(entry.p50_duration),
            seconds(entry.p95_duration),
            Text(_flaky(entry) or "-"),
        )
    _console().print(table)


@app.command("retry")
@_json_errors()
def retry_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The recorded run's id, or the start of it.")],
    *,
    from_failed: Annotated[
        bool,
        typer.Option("--from-failed", help="Do not run again the stages that succeeded: restore their outputs."),
    ] = False,
    pipeline_from: Annotated[
        str | None,
        typer.Option(
            "--pipeline-from",
            metavar="FILE",
            help="Load the pipeline from here instead of from where the run recorded it came from.",
        ),
    ] = None,
    parallel: ParallelOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
    plain: PlainOption = False,
    log_level: LogLevelOption = LogLevel.ERROR,
    backend: BackendOption = "asyncio",
) -> None:
    """Run a recorded run again with the same input, recording the new run as its retry."""

    async def find() -> RunRecord:
        async with open_store(_existing(db)) as store:
            return await store.get_run(run_id)

    record = _call(find, backend=backend)
    try:
        loaded = (
            load_pipeline(pipeline_from)
            if pipeline_from is not None
            else load_definition(record.definition, record.source or "", run_id=record.id)
        )
    except LoadError as exc:
        _fail(str(exc), EXIT_USAGE)
    if loaded.pipeline.name != record.pipeline:
        _fail(f"run {record.id} is of pipeline {record.pipeline!r}, not {loaded.pipeline.name!r}", EXIT_USAGE)
    if not record.input_restorable:
        _fail(f"run {record.id}: its input was not recorded faithfully (not JSON), so it cannot run again", EXIT_FAILED)
    restore: dict[str, Any] = {}
    if from_failed:
        restore = record.restorable_outputs(set(loaded.pipeline.stage_names))
    metadata = {TRIGGER: "retry", RETRY_OF: record.id, SOURCE: loaded.source}
    if loaded.definition is not None:
        metadata[DEFINITION] = loaded.definition
    request = pk.PipelineRequest(
        type=record.request_type,
        input=record.input,
        options=pk.RequestOptions(restore=restore, max_parallel=parallel),
        metadata=metadata,
    )
    job = _Job(
        loaded=loaded,
        request=request,
        db=db,
        display=_display(as_json=as_json, plain=plain, pipeline=loaded.pipeline, retry_of=record.id),
        retry_of=record.id,
        restored=tuple(restore),
    )
    outcome = _call(_execute, job, backend=backend, log_level=log_level)
    raise typer.Exit(_finish(job, outcome))


@app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of pipeline files (for editors and linters)."""
    from pipekit.spec._schema import schema_text  # noqa: PLC0415 - only this command needs it

    typer.echo(schema_text(), nl=False)


@app.command("version")
def version_command() -> None:
    """Print pipekit's version."""
    typer.echo(f"pipekit {pk.__version__}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``pipekit`` command (with ``argv``, or the process's arguments).

    Args:
        argv: The arguments after the command's name.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(args=None if argv is None else list(argv), prog_name="pipekit", standalone_mode=False)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except typer.TyperException as exc:  # click's usage errors: unknown option, missing argument...
        # One line, like every other bad input (Typer would draw a box of several).
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "pipekit"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"pipekit: error: {message} (see `{where} --help`)\n")
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    sys.exit(code if isinstance(code, int) else 0)

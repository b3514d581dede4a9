"""Scenarios 7 and 8: `pipekit.ci.CommandStage` against a hand-written anyio process loop.

7. Command overhead: a sequential pipeline of N command stages, each running
   ``true`` (spawning it costs 0.3-0.5 ms here; a Python interpreter's 10-20 ms
   of start-up would hide everything else), against the same N commands run
   by hand in a loop.
8. Output streaming: one command printing M short lines, with nobody
   listening and with one hook receiving every `pipekit.ci.OutputLine`,
   against the hand-written loop reading the same lines into bounded deques.

The hand-written loop is what a careful user writes to run a command and keep
the end of its output: ``anyio.open_process`` (stdin from ``/dev/null``, a new
session so the process group could be killed, as pipekit does), one task per
stream in a task group reading chunks, splitting them into lines and decoding
each into a ``deque(maxlen=...)``, then ``process.wait()``.

`CommandStage` logs every line with ``ctx.log.info``: structlog is configured
here as a service configures it (info dropped, see `quiet_logging`), and the
previous configuration restored afterwards.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import anyio
import anyio.abc
import structlog

import pipekit as pk
from pipekit.ci import CommandResult, CommandStage, OutputLine

from ._baselines import chain
from ._harness import Row, Scenario, Settings, compare, median, paired_difference, paired_ratio, summarise

COMMANDS = "7 commands"
OUTPUT = "8 output"
HAND_WRITTEN = "hand-written process loop"

#: pipekit's time per command, at most, as a multiple of the hand-written loop's for `true` (see the README).
COMMAND_BUDGET = 1.5
#: µs per line pipekit may add, with nobody listening and with one hook.
LINE_BUDGET = 1.0
HOOKED_LINE_BUDGET = 10.0

#: Lines each stream's deque keeps in the hand-written loop.
KEEP_LINES = 10_000

#: The baselines' short names, as the table shows them, and what each one is.
LEGEND = {
    HAND_WRITTEN: (
        "`anyio.open_process` (stdin from /dev/null, `start_new_session=True`), one task per stream in a task "
        "group reading chunks, splitting them into lines and decoding each into a `deque(maxlen=10_000)`, then "
        "`process.wait()`; in a loop for N commands"
    ),
}


@contextmanager
def quiet_logging() -> Iterator[None]:
    """Drop structlog's info lines, as a service does (``CommandStage`` logs every output line); restore after."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)


async def _read_lines(stream: anyio.abc.ByteReceiveStream, keep: deque[str]) -> None:
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            keep.append(line.decode("utf-8", "replace"))
    if pending:
        keep.append(pending.decode("utf-8", "replace"))


async def run_by_hand(argv: Sequence[str], out: deque[str], err: deque[str]) -> int:
    """Run ``argv`` as a careful user does by hand; its lines go to ``out`` and ``err``; return its status."""
    async with await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_lines, process.stdout, out)
            tg.start_soon(_read_lines, process.stderr, err)
            status = await process.wait()
    return status


async def by_hand(argv: Sequence[str], n: int) -> deque[str]:
    """Run ``argv`` ``n`` times in a loop, each with its own bounded tails; return the last stdout tail."""
    out: deque[str] = deque()
    for _ in range(n):
        out, err = deque[str](maxlen=KEEP_LINES), deque[str](maxlen=KEEP_LINES)
        status = await run_by_hand(argv, out, err)
        if status != 0:
            raise RuntimeError(f"{argv[0]} exited with status {status}")
    return out


class LineCounter:
    """A hook that counts the `OutputLine` events it receives (and ignores the others)."""

    def __init__(self) -> None:
        self.lines = 0

    async def __call__(self, event: pk.Event) -> None:
        if isinstance(event, OutputLine):
            self.lines += 1


def printer(lines: int) -> list[str]:
    """A command printing ``lines`` short lines (``line``) in one write."""
    return [sys.executable, "-c", f"import sys; sys.stdout.write('line\\n' * {lines})"]


async def _check(commands: pk.Pipeline, n: int, output: pk.Pipeline, argv: Sequence[str], m: int) -> None:
    """Make sure the measured runs do what they claim (once, untimed)."""
    response = await commands.execute()
    statuses = [r.output.returncode for r in response.stages.values() if isinstance(r.output, CommandResult)]
    if response.status is not pk.Status.SUCCEEDED or statuses != [0] * n:
        raise RuntimeError(f"the command benchmark's pipeline did not succeed: {response.summary()}")
    counter = LineCounter()
    response = await output.execute(hooks=[counter])
    result = response.outputs.get("print")
    if (
        response.status is not pk.Status.SUCCEEDED
        or not isinstance(result, CommandResult)
        or result.stdout.count("\n") != m
        or counter.lines != m
    ):
        raise RuntimeError(f"the output benchmark did not see {m} lines: {response.summary()}, {counter.lines}")
    kept = await by_hand(argv, 1)
    if len(kept) != min(m, KEEP_LINES) or kept[-1] != "line":
        raise RuntimeError(f"the hand-written loop kept {len(kept)} lines of {m}")


async def run(settings: Settings, backend: str) -> Scenario:
    n = 3 if settings.smoke else 50
    m = 1_000 if settings.smoke else 100_000
    true = shutil.which("true")
    if true is None:
        return Scenario(rows=[], notes=["skipped: scenarios 7 and 8 need `true` on PATH"])
    commands = chain("commands", [CommandStage(f"c{i}", ["true"]) for i in range(n)])
    argv = printer(m)
    output = chain("output", [CommandStage("print", argv)])
    counter = LineCounter()

    with quiet_logging():
        await _check(commands, n, output, argv, m)
        spawn = await compare({HAND_WRITTEN: partial(by_hand, [true], n), "pipekit": commands.execute}, settings)
        stream = await compare(
            {
                HAND_WRITTEN: partial(by_hand, argv, 1),
                "pipekit": output.execute,
                "pipekit, one hook": partial(output.execute, hooks=[counter]),
            },
            settings,
        )

    per_command, per_line = 1e6 / n, 1e6 / m
    case = f"N={n} commands `true`, sequential"
    rows = [
        Row(
            scenario=COMMANDS,
            backend=backend,
            case=case,
            baseline=HAND_WRITTEN,
            unit="µs/command",
            baseline_value=median(spawn[HAND_WRITTEN]) * per_command,
            pipekit_value=median(spawn["pipekit"]) * per_command,
            kind="ratio",
            result=paired_ratio(spawn, "pipekit", HAND_WRITTEN),
            target=COMMAND_BUDGET,
        ),
        Row(
            scenario=COMMANDS,
            backend=backend,
            case=f"{case}: overhead per command",
            baseline=HAND_WRITTEN,
            unit="µs/command",
            baseline_value=median(spawn[HAND_WRITTEN]) * per_command,
            pipekit_value=median(spawn["pipekit"]) * per_command,
            kind="overhead",
            result=paired_difference(spawn, "pipekit", HAND_WRITTEN) * per_command,
        ),
    ]
    for variant, what, budget in (
        ("pipekit", "nobody listening", LINE_BUDGET),
        ("pipekit, one hook", "one hook receiving every OutputLine", HOOKED_LINE_BUDGET),
    ):
        baseline_value = median(stream[HAND_WRITTEN]) * per_line
        pipekit_value = median(stream[variant]) * per_line
        rows += [
            Row(
                scenario=OUTPUT,
                backend=backend,
                case=f"M={m} lines, {what}",
                baseline=HAND_WRITTEN,
                unit="µs/line",
                baseline_value=baseline_value,
                pipekit_value=pipekit_value,
                kind="overhead",
                result=paired_difference(stream, variant, HAND_WRITTEN) * per_line,
                target=budget,
            ),
            Row(
                scenario=OUTPUT,
                backend=backend,
                case=f"M={m} lines, {what}",
                baseline=HAND_WRITTEN,
                unit="µs/line",
                baseline_value=baseline_value,
                pipekit_value=pipekit_value,
                kind="ratio",
                result=paired_ratio(stream, variant, HAND_WRITTEN),
            ),
        ]
    details = {
        "µs/command": summarise(spawn, per_command),
        "µs/line": summarise(stream, per_line),
    }
    return Scenario(rows=rows, details=details)

"""Running one command: streamed output, bounded tails, and no process left behind.

Each command starts in a new session, so it leads its own process group.
When it is interrupted (a timeout, a cancellation) the whole group gets
SIGTERM, then SIGKILL after a grace period, from shielded clean-up. When it
exits on its own, processes it left running in its group are ended the same
way, so no grandchild outlives its stage (CI runners do the same).

The output readers are shielded too: they go on reading while the group is
being ended, so what a command prints when it gets SIGTERM, and a last line
without a newline, are not lost. Once the group is gone they read what is
left and stop; if a process that left the group (a ``setsid`` daemon) still
holds the pipes, they stop once they have waited a moment in all for its
output (it is silent, or prints only now and then).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import anyio
import anyio.abc

__all__ = ["Tail", "run_process"]

Stream = Literal["stdout", "stderr"]

#: Lines longer than this arrive in pieces (a line never grows without bound).
MAX_LINE = 64 * 1024
_READ = 65536
#: Once the command's group is gone, reading stops when the pipes have stayed empty for this long,
#: or when the readers have waited this long in all for output that trickles in...
_DRAIN_IDLE = 1.0
#: ... or when this much more was read (a process outside the group could print forever).
_DRAIN_LIMIT = 4 * 1024 * 1024
#: Seconds handling the last, unfinished line of a reader that is stopped may take.
_FLUSH_TIMEOUT = 1.0


class Tail:
    """The last ``limit`` bytes of one stream's lines (whole lines, oldest dropped first)."""

    __slots__ = ("_lines", "_size", "limit", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lines: deque[str] = deque()
        self._size = 0
        self.truncated = False

    def add(self, line: str) -> None:
        """Keep ``line``; drop the oldest lines beyond the limit (and the start of a line longer than it)."""
        if len(line) >= self.limit:  # alone it fills the tail: keep its end, so the last words are never lost
            line = line[len(line) - self.limit + 1 :]
            self.truncated = True
        size = len(line) + 1
        self._lines.append(line)
        self._size += size
        while self._size > self.limit and self._lines:
            self._size -= len(self._lines.popleft()) + 1
            self.truncated = True

    def text(self) -> str:
        """The lines kept, newline-terminated."""
        return "".join(f"{line}\n" for line in self._lines)


class _Reader:
    """Reads one output stream to its end in a shielded scope (stopped with ``scope.cancel()``)."""

    __slots__ = ("done", "received", "scope", "waited", "waiting_since")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope(shield=True)
        self.done = anyio.Event()
        self.received = 0  # bytes
        self.waited = 0.0  # seconds spent waiting for output, before the current wait
        self.waiting_since: float | None = None  # when the current wait for output began (None: handling a line)

    @property
    def waiting(self) -> bool:
        """Whether it is waiting for output (not handling a line)."""
        return self.waiting_since is not None

    def idle(self, now: float) -> float:
        """Seconds spent waiting for output so far."""
        return self.waited + (0.0 if self.waiting_since is None else now - self.waiting_since)

    async def run(
        self, stream: anyio.abc.ByteReceiveStream, name: Stream, on_line: Callable[[Stream, str], Awaitable[None]]
    ) -> None:
        try:
            with self.scope:
                await self._pump(stream, name, on_line)
        finally:
            self.done.set()

    async def _pump(
        self, stream: anyio.abc.ByteReceiveStream, name: Stream, on_line: Callable[[Stream, str], Awaitable[None]]
    ) -> None:
        """Read ``stream`` to its end, calling ``on_line`` for each line as it arrives."""

        async def handle(line: str) -> None:
            await on_line(name, line)

        pending = b""
        while True:
            self.waiting_since = anyio.current_time()
            try:
                chunk = await stream.receive(_READ)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                break
            except anyio.get_cancelled_exc_class():
                if pending:  # stopped: the unfinished last line is still a line
                    with anyio.CancelScope(shield=True), anyio.move_on_after(_FLUSH_TIMEOUT):
                        await handle(_text(pending))
                raise
            finally:
                self.waited += anyio.current_time() - self.waiting_since
                self.waiting_since = None
            self.received += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if len(line) > MAX_LINE:
                    line = await _pieces(line, handle)  # noqa: PLW2901 - what is left of it
                await handle(_text(line))
            if len(pending) > MAX_LINE:
                pending = await _pieces(pending, handle)
        if pending:
            await handle(_text(pending))


def _text(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


async def _drain(readers: Sequence[_Reader]) -> None:
    """Let the readers handle what the ended group left in the pipes, up to their end.

    What the group left is read at once: only a process outside the group can
    still make a reader wait for output. So this gives up when every reader
    still going has been waiting for output that did not come for
    `_DRAIN_IDLE` seconds, or has waited `_DRAIN_IDLE` seconds in all for
    output that trickles in, or when `_DRAIN_LIMIT` more bytes were read. A
    reader busy handling lines (a slow subscriber) is never cut short.
    """
    limit = sum(r.received for r in readers) + _DRAIN_LIMIT
    start = anyio.current_time()
    idle0 = [r.idle(start) for r in readers]
    while True:
        before = [r.received for r in readers]
        with anyio.move_on_after(_DRAIN_IDLE):
            for reader in readers:
                await reader.done.wait()
            return
        if sum(r.received for r in readers) > limit:
            return
        if all(r.done.is_set() or (r.waiting and r.received == n) for r, n in zip(readers, before, strict=True)):
            return
        now = anyio.current_time()
        if all(r.done.is_set() or r.idle(now) - i >= _DRAIN_IDLE for r, i in zip(readers, idle0, strict=True)):
            return


async def _pieces(data: bytes, handle: Callable[[str], Awaitable[None]]) -> bytes:
    """Send ``data`` on in pieces of at most `MAX_LINE` bytes while it is longer; return the rest.

    Pieces end on a character boundary, so a cut never garbles UTF-8 text.
    """
    while len(data) > MAX_LINE:
        cut = MAX_LINE
        while cut > MAX_LINE - 3 and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off
            cut -= 1
        await handle(data[:cut].decode("utf-8", "replace"))
        data = data[cut:]
    return data


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed its user id
        return True
    return True


async def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running.

    Zombies do not count: an orphan stays one until init reaps it, which
    some container inits do only every few seconds, and some never.
    """
    return _signal_group(pgid, 0) and await anyio.to_thread.run_sync(_running_member, pgid)


def _running_member(pgid: int) -> bool:
    """Whether ``/proc`` lists a process of group ``pgid`` that is not a zombie (True without ``/proc``)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: count zombies as running
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read()
        except OSError:  # ended meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp, *_ = stat[stat.rfind(b")") + 2 :].split(maxsplit=3)
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return True
    return False


async def _end_group(process: anyio.abc.Process, pgid: int, grace: float) -> None:
    """SIGTERM the whole group, SIGKILL what is left after ``grace`` seconds; reap the command.

    Returns once the group is gone (a SIGKILL is delivered asynchronously:
    the processes may still run for a moment after it is sent). Runs
    shielded, bounded by ``grace`` plus a few seconds.
    """
    with anyio.CancelScope(shield=True):
        if _signal_group(pgid, signal.SIGTERM):
            with anyio.move_on_after(grace):
                await _wait_group(process, pgid)
            if _signal_group(pgid, signal.SIGKILL):
                with anyio.move_on_after(5):
                    await _wait_group(process, pgid)
        with anyio.move_on_after(5):
            await process.wait()


async def _wait_group(process: anyio.abc.Process, pgid: int) -> None:
    """Wait until the command has exited and no process of its group runs any more."""
    await process.wait()
    while await _group_alive(pgid):  # noqa: ASYNC110 - nothing signals a process group's end
        await anyio.sleep(0.02)


async def run_process(
    command: str | Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    on_line: Callable[[Stream, str], Awaitable[None]],
    kill_grace: float,
) -> int:
    """Run ``command`` to its end, streaming its output; return its exit status.

    A string runs through ``/bin/sh -c``; a sequence is executed directly.
    A negative status means the command was killed by that signal.

    Raises:
        FileNotFoundError: The executable, the interpreter of its ``#!`` line, or ``cwd`` does not exist.
        PermissionError: The executable is not executable.
        OSError: It cannot be started otherwise (``ENOEXEC``: not a program this system runs).
    """
    process = await anyio.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=None if env is None else dict(env),
        start_new_session=True,
    )
    pgid = process.pid  # start_new_session: the command leads its own group
    readers = (_Reader(), _Reader())
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None
            assert process.stderr is not None
            tg.start_soon(readers[0].run, process.stdout, "stdout", on_line)
            tg.start_soon(readers[1].run, process.stderr, "stderr", on_line)
            try:
                returncode = await process.wait()
                # Whatever the command left running in its group still holds
                # the pipes (the readers would never see their end): end it.
                if await _group_alive(pgid):
                    await _end_group(process, pgid, kill_grace)
                await _drain(readers)
            except BaseException:
                # Interrupted: end the group while the (shielded) readers go on reading.
                with anyio.CancelScope(shield=True):
                    await _end_group(process, pgid, kill_grace)
                    await _drain(readers)
                raise
            finally:
                for reader in readers:
                    reader.scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return returncode

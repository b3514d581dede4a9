"""Test doubles shared by several test modules, built on the kit's MockStage."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import psutil  # type: ignore[import-untyped]

import pipekit as pk
from pipekit.testing import MockStage

#: Something a rollback awaits (to take time, block, wait or signal).
Body = Callable[[], Awaitable[None]]


class YieldingMock(MockStage):
    """A `MockStage` that yields to the event loop in ``execute`` and ``rollback``, as real stages do.

    Its rollback also awaits ``undo``, when given. The kit's MockStage never
    awaits without a ``delay``, and its rollback never does: a rollback that
    can't be interrupted passes even when the engine forgets to shield it.
    """

    def __init__(self, name: str, *, undo: Body | None = None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.undo = undo

    async def execute(self, ctx: pk.StageContext) -> Any:
        output = await super().execute(ctx)
        await anyio.lowlevel.checkpoint()
        return output

    async def rollback(self, ctx: pk.StageContext) -> None:
        await anyio.lowlevel.checkpoint()
        await super().rollback(ctx)
        if self.undo is not None:
            await self.undo()


# -- processes ----------------------------------------------------------------------------------


def new_marker() -> str:
    """Unique digits to put in the command lines of the processes a test starts."""
    return f"{uuid.uuid4().int % 10**15:015d}"


def survivors(marker: str) -> list[psutil.Process]:
    """The live (not zombie) processes whose command line mentions ``marker``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(marker in part for part in cmdline):
            found.append(process)
    return found


async def signal_cli(project: Path, args: list[str], steps: list[tuple[str, signal.Signals]]) -> tuple[int, str, str]:
    """Run ``python -m pipekit.cli ARGS`` in ``project``; send each signal once its file exists; the outcome.

    Returns:
        The exit status, stdout and stderr.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(pk.__file__).parent.parent)}
    out: list[bytes] = []
    err: list[bytes] = []

    async def drain(stream: anyio.abc.ByteReceiveStream, into: list[bytes]) -> None:
        async for chunk in stream:
            into.append(chunk)

    process = await anyio.open_process([sys.executable, "-m", "pipekit.cli", *args], cwd=project, env=env)
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None
            assert process.stderr is not None
            tg.start_soon(drain, process.stdout, out)
            tg.start_soon(drain, process.stderr, err)
            for name, signum in steps:
                with anyio.fail_after(20):
                    while not await anyio.Path(project / name).exists():
                        assert process.returncode is None, b"".join(err).decode()
                        await anyio.sleep(0.05)
                process.send_signal(signum)
            with anyio.fail_after(30):
                returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await process.aclose()
    return returncode, b"".join(out).decode(), b"".join(err).decode()

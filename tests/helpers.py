"""Test doubles shared by several test modules, built on the kit's MockStage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

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

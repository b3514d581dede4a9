"""Running a pipeline from synchronous code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ._pipeline import make_request

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._request import PipelineRequest, PipelineResponse

__all__ = ["run"]


def run(
    pipeline: Pipeline,
    request: PipelineRequest | None = None,
    *,
    input: Mapping[str, Any] | None = None,  # noqa: A002 - the documented name
    backend: str = "asyncio",
) -> PipelineResponse:
    """Run ``pipeline`` from synchronous code (a script) and return the response.

    Starts an event loop with `anyio.run`; don't call it from async code.

    Args:
        pipeline: The pipeline.
        request: The request; built from ``input`` when omitted.
        input: The request input, when no request is given.
        backend: ``"asyncio"`` or ``"trio"``.

    Returns:
        The response (stage failures do not raise).
    """
    request = make_request(pipeline, request, input, "pipekit.run()")

    async def main() -> PipelineResponse:
        return await pipeline.execute(request)

    return anyio.run(main, backend=backend)

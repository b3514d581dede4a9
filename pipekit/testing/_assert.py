"""Assertions about a run, whose failure messages show the whole run."""

from __future__ import annotations

from collections.abc import Sequence

from pipekit._request import PipelineResponse
from pipekit._status import Status

__all__ = ["assert_rolled_back", "assert_stage_order", "assert_status"]


def _fail(message: str, response: PipelineResponse) -> AssertionError:
    return AssertionError(f"{message}\n\n{response.summary()}")


def assert_status(response: PipelineResponse, status: Status) -> None:
    """Assert the run ended with ``status``.

    Raises:
        AssertionError: Showing the run's per-stage report.
    """
    if response.status is not status:
        raise _fail(f"expected the run to be {status.value}, it is {response.status.value}", response)


def assert_stage_order(response: PipelineResponse, stages: Sequence[str]) -> None:
    """Assert the stages that started did so in exactly this order.

    Raises:
        AssertionError: Showing the actual order and the run's report.
    """
    started = sorted(
        (r for r in response.stages.values() if r.start_index is not None),
        key=lambda r: r.start_index or 0,
    )
    actual = [r.name for r in started]
    if actual != list(stages):
        raise _fail(f"expected the stages to start in the order {list(stages)}, they started {actual}", response)


def assert_rolled_back(response: PipelineResponse, stages: Sequence[str], *, order: bool = False) -> None:
    """Assert exactly ``stages`` were rolled back (successfully), in that order if ``order``.

    Raises:
        AssertionError: Showing what was rolled back, in what order, and the run's report.
    """
    undone = sorted(
        (r for r in response.stages.values() if r.rolled_back),
        key=lambda r: r.rollback_index if r.rollback_index is not None else -1,
    )
    actual = [r.name for r in undone]
    if order:
        if actual != list(stages):
            raise _fail(f"expected rollbacks in the order {list(stages)}, they ran {actual}", response)
    elif sorted(actual) != sorted(stages):
        raise _fail(f"expected {sorted(stages)} rolled back, got {sorted(actual)}", response)

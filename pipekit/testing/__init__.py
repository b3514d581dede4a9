"""Testing pipelines without infrastructure and without waiting.

- `MockStage`: a stage that returns what you say, fails when you say, and
  records every call (with the context it saw); `TestPipeline` swaps one in for
  any stage of an existing pipeline.
- A fake clock (`fake_clock_backend`, `run_with_fake_clock`, the
  ``pipekit_clock`` fixture): retry back-off, delays and timeouts take no real
  time and are exact.
- `capture_spans` / `assert_span_tree`, `capture_events`, `capture_logs`.
- `assert_status`, `assert_stage_order`, `assert_rolled_back`, whose failure
  messages show the whole run.
- A pytest plugin (installed with pipekit) with the fixtures ``pipekit_spans``,
  ``pipekit_events``, ``pipekit_clock`` and ``mock_stage``.
"""

from __future__ import annotations

from pipekit._exports import fixup_module_metadata as _fixup

from ._assert import assert_rolled_back as assert_rolled_back
from ._assert import assert_stage_order as assert_stage_order
from ._assert import assert_status as assert_status
from ._capture import EventCapture as EventCapture
from ._capture import SpanCapture as SpanCapture
from ._capture import assert_span_tree as assert_span_tree
from ._capture import capture_events as capture_events
from ._capture import capture_logs as capture_logs
from ._capture import capture_spans as capture_spans
from ._clock import FakeClock as FakeClock
from ._clock import FakeClockEventLoop as FakeClockEventLoop
from ._clock import VirtualClock as VirtualClock
from ._clock import current_fake_clock as current_fake_clock
from ._clock import fake_clock_backend as fake_clock_backend
from ._clock import run_with_fake_clock as run_with_fake_clock
from ._mock import Call as Call
from ._mock import MockStage as MockStage
from ._mock import MockStageError as MockStageError
from ._mock import TestPipeline as TestPipeline

__all__ = (
    "Call",
    "EventCapture",
    "FakeClock",
    "FakeClockEventLoop",
    "MockStage",
    "MockStageError",
    "SpanCapture",
    "TestPipeline",
    "VirtualClock",
    "assert_rolled_back",
    "assert_span_tree",
    "assert_stage_order",
    "assert_status",
    "capture_events",
    "capture_logs",
    "capture_spans",
    "current_fake_clock",
    "fake_clock_backend",
    "run_with_fake_clock",
)


_fixup(__name__, globals(), __all__)
del _fixup

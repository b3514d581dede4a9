"""The recorder's in-memory state of runs and stages, and how values are turned into JSON text."""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from pipekit._status import Status

from ._values import RollbackStatus, RunRow, StageRow

__all__ = ["RUNNING", "RunState", "StageState", "describe", "encode_input", "encode_json"]

RUNNING = Status.RUNNING.value


def describe(error: BaseException | None) -> str | None:
    """``"Type: message"`` of ``error``, and of its cause when the message does not say it already."""
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) not in text:
        detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        text += f" (caused by {detail})"
    return text


#: The key that tags pipekit's own values in stored JSON, so they are restored as themselves.
TYPE_TAG = "__pipekit_type__"
#: pipekit values stored tagged (by their public path), and the fields they are rebuilt from.
TAGGED = {"pipekit.ci.CommandResult": ("args", "returncode", "stdout", "stderr", "duration", "truncated")}


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    path = f"{type(value).__module__}.{type(value).__qualname__}"
    fields = TAGGED.get(path)
    if fields is not None:
        return {TYPE_TAG: path, **{name: getattr(value, name) for name in fields}}
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _plain_keys(value: object) -> bool:
    """Whether every mapping in ``value`` has string keys only (JSON would silently turn others into strings)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, Mapping):
            for key, member in item.items():
                if not isinstance(key, str):
                    return False
                todo.append(member)
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return True


def encode_json(value: object, limit: float = math.inf) -> str | None:
    """``value`` as JSON text if decoding gives it back (tuples as lists, mappings as dicts), else None.

    None for anything JSON cannot hold faithfully: other types, non-string
    keys, NaN and infinities, cycles, or more than ``limit`` characters.
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError, RecursionError):
        return None
    if len(text) > limit or not _plain_keys(value):
        return None
    return text


def encode_input(value: Mapping[str, Any]) -> tuple[str, bool]:
    text = encode_json(value)
    if text is not None:
        return text, True
    lossy = {str(k): v if encode_json(v) is not None else repr(v) for k, v in value.items()}
    return json.dumps(lossy, ensure_ascii=False, default=repr), False


class StageState:
    """The recorded state of one stage (mutable; snapshot as a `StageRow`)."""

    __slots__ = (
        "attempts",
        "duration",
        "error",
        "finished_at",
        "name",
        "output",
        "output_restorable",
        "pipeline",
        "position",
        "reason",
        "rollback_error",
        "rollback_status",
        "started_at",
        "status",
        "tail",
        "tail_bytes",
    )

    def __init__(self, name: str, pipeline: str, position: int) -> None:
        """A stage first seen in a run, ``position``-th."""
        self.name = name
        self.pipeline = pipeline
        self.position = position
        self.status = Status.PENDING.value
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.duration: float | None = None
        self.output: str | None = None
        self.output_restorable = True
        self.error: str | None = None
        self.reason: str | None = None
        self.rollback_status: RollbackStatus | None = None
        self.rollback_error: str | None = None
        self.tail: deque[str] = deque()
        self.tail_bytes = 0

    def finish(self, status: str, timestamp: float, duration: float | None = None) -> None:
        self.status = status
        self.finished_at = timestamp
        if duration is None:
            duration = timestamp - self.started_at if self.started_at is not None else 0.0
        elif self.started_at is None:
            self.started_at = timestamp - duration
        self.duration = max(duration, 0.0)

    def row(self, run_id: str) -> StageRow:
        return StageRow(
            run_id=run_id,
            stage=self.name,
            pipeline=self.pipeline,
            position=self.position,
            status=self.status,
            attempts=self.attempts,
            started_at=self.started_at,
            finished_at=self.finished_at,
            duration=self.duration,
            output=self.output,
            output_restorable=self.output_restorable,
            error=self.error,
            reason=self.reason,
            rollback_status=self.rollback_status,
            rollback_error=self.rollback_error,
            log_tail=tuple(self.tail),
        )


class RunState:
    """The recorded state of one execution (mutable; snapshot as a `RunRow`)."""

    __slots__ = ("duration", "error", "finished_at", "prefixes", "stages", "status", "template", "updated_at")

    def __init__(self, template: RunRow) -> None:
        self.template = template  # the fields that never change
        self.status = RUNNING
        self.updated_at = template.started_at
        self.finished_at: float | None = None
        self.duration: float | None = None
        self.error: str | None = None
        self.stages: dict[str, StageState] = {}
        # Nested pipelines' names -> the prefix of their stages' names ("inner/").
        self.prefixes: dict[str, str] = {template.pipeline: ""}

    @property
    def id(self) -> str:
        return self.template.id

    def row(self) -> RunRow:
        return attrs.evolve(
            self.template,
            status=self.status,
            updated_at=self.updated_at,
            finished_at=self.finished_at,
            duration=self.duration,
            error=self.error,
        )

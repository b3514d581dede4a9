"""pipekit: an async, actor-style pipeline engine for asyncio and trio.

Stages run over a typed [`StageContext`][pipekit.StageContext] in atomic, workflow, conditional,
parallel and graph compositions, with retries, enforced timeouts, rollback on
failure, cancellation and events. ``import pipekit as pk``.
"""

from __future__ import annotations

from ._context import Key as Key
from ._context import StageContext as StageContext
from ._engine import Engine as Engine
from ._engine import ExecutionHandle as ExecutionHandle
from ._engine import PipelineMetrics as PipelineMetrics
from ._errors import ContextConflictError as ContextConflictError
from ._errors import PipekitError as PipekitError
from ._errors import PipelineCancelledError as PipelineCancelledError
from ._errors import PipelineDefinitionError as PipelineDefinitionError
from ._errors import PipelineTimeoutError as PipelineTimeoutError
from ._errors import RollbackError as RollbackError
from ._errors import RollbackTimeoutError as RollbackTimeoutError
from ._errors import StageFailedError as StageFailedError
from ._errors import StageTimeoutError as StageTimeoutError
from ._errors import ValidationError as ValidationError
from ._events import Event as Event
from ._events import PipelineFinished as PipelineFinished
from ._events import PipelineStarted as PipelineStarted
from ._events import RollbackFinished as RollbackFinished
from ._events import RollbackStarted as RollbackStarted
from ._events import StageCancelled as StageCancelled
from ._events import StageFailed as StageFailed
from ._events import StageRetrying as StageRetrying
from ._events import StageRollbackFailed as StageRollbackFailed
from ._events import StageRolledBack as StageRolledBack
from ._events import StageSkipped as StageSkipped
from ._events import StageStarted as StageStarted
from ._events import StageSucceeded as StageSucceeded
from ._exports import fixup_module_metadata as _fixup
from ._history import RecordedRun as RecordedRun
from ._history import RecordedStage as RecordedStage
from ._history import RunStore as RunStore
from ._pipeline import AtomicPipeline as AtomicPipeline
from ._pipeline import Hook as Hook
from ._pipeline import Pipeline as Pipeline
from ._pipeline import Validator as Validator
from ._pipeline import WorkflowPipeline as WorkflowPipeline
from ._policy import ExponentialBackoff as ExponentialBackoff
from ._policy import RetryPolicy as RetryPolicy
from ._request import PipelineRequest as PipelineRequest
from ._request import PipelineResponse as PipelineResponse
from ._request import RequestOptions as RequestOptions
from ._request import StageResult as StageResult
from ._stage import BaseStage as BaseStage
from ._stage import FunctionStage as FunctionStage
from ._stage import RollsBack as RollsBack
from ._stage import Stage as Stage
from ._stage import Validates as Validates
from ._stage import stage as stage
from ._status import Status as Status
from ._sync import run as run
from ._version import __version__ as __version__

__all__ = (
    "AtomicPipeline",
    "BaseStage",
    "ContextConflictError",
    "Engine",
    "Event",
    "ExecutionHandle",
    "ExponentialBackoff",
    "FunctionStage",
    "Hook",
    "Key",
    "PipekitError",
    "Pipeline",
    "PipelineCancelledError",
    "PipelineDefinitionError",
    "PipelineFinished",
    "PipelineMetrics",
    "PipelineRequest",
    "PipelineResponse",
    "PipelineStarted",
    "PipelineTimeoutError",
    "RecordedRun",
    "RecordedStage",
    "RequestOptions",
    "RetryPolicy",
    "RollbackError",
    "RollbackFinished",
    "RollbackStarted",
    "RollbackTimeoutError",
    "RollsBack",
    "RunStore",
    "Stage",
    "StageCancelled",
    "StageContext",
    "StageFailed",
    "StageFailedError",
    "StageResult",
    "StageRetrying",
    "StageRollbackFailed",
    "StageRolledBack",
    "StageSkipped",
    "StageStarted",
    "StageSucceeded",
    "StageTimeoutError",
    "Status",
    "Validates",
    "ValidationError",
    "Validator",
    "WorkflowPipeline",
    "run",
    "stage",
)


_fixup(__name__, globals(), __all__)
del _fixup

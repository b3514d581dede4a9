"""Run history: every execution, its stages, outputs and logs, kept in a database.

- `RunRecorder`: a hook that records the runs whose events it receives,
  writing in batches off the run's path.
- `SqliteStore`: the embedded default store (``.pipekit/pipekit.db``), one
  SQLite file in WAL mode, its schema migrated in code.
- `RunStore`: the protocol another database can implement; queries return
  frozen `RunRecord`, `StageRecord`, `RunPage` and `PipelineStats` values.
- Errors: `StoreError`, `StoreLockedError`, `StoreVersionError`,
  `RunNotFoundError`, each with a one-line message.
"""

from __future__ import annotations

from pipekit._exports import fixup_module_metadata as _fixup

from ._errors import RunNotFoundError as RunNotFoundError
from ._errors import StoreError as StoreError
from ._errors import StoreLockedError as StoreLockedError
from ._errors import StoreVersionError as StoreVersionError
from ._recorder import RecorderStatistics as RecorderStatistics
from ._recorder import RunRecorder as RunRecorder
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite import DEFAULT_PATH as DEFAULT_PATH
from ._sqlite import SqliteStore as SqliteStore
from ._sqlite import open_store as open_store
from ._values import INTERRUPTED as INTERRUPTED
from ._values import RUN_STATUSES as RUN_STATUSES
from ._values import PipelineStats as PipelineStats
from ._values import RunPage as RunPage
from ._values import RunRecord as RunRecord
from ._values import RunRow as RunRow
from ._values import RunStore as RunStore
from ._values import StageRecord as StageRecord
from ._values import StageRow as StageRow
from ._values import WriteBatch as WriteBatch

__all__ = (
    "DEFAULT_PATH",
    "INTERRUPTED",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "PipelineStats",
    "RecorderStatistics",
    "RunNotFoundError",
    "RunPage",
    "RunRecord",
    "RunRecorder",
    "RunRow",
    "RunStore",
    "SqliteStore",
    "StageRecord",
    "StageRow",
    "StoreError",
    "StoreLockedError",
    "StoreVersionError",
    "WriteBatch",
    "open_store",
)


_fixup(__name__, globals(), __all__)
del _fixup

from __future__ import annotations

import types

import pipekit as pk


class TestExports:
    def test_all_names_exist(self) -> None:
        """Every name in __all__ is importable from pipekit."""
        missing = [name for name in pk.__all__ if not hasattr(pk, name)]
        assert missing == []

    def test_all_is_sorted_tuple_without_duplicates(self) -> None:
        """__all__ is a sorted tuple with each name once."""
        assert isinstance(pk.__all__, tuple)
        assert list(pk.__all__) == sorted(set(pk.__all__))

    def test_public_names_are_listed(self) -> None:
        """Every public attribute of the package is in __all__ (nothing exported by accident)."""
        public = {
            name
            for name, value in vars(pk).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)  # documented subpackages
        } - {"annotations"}
        assert public - set(pk.__all__) == set()

    def test_module_paths_are_public(self) -> None:
        """Re-exported classes report the public module, so reprs say pipekit.X."""
        for name in pk.__all__:
            obj = getattr(pk, name)
            module = getattr(obj, "__module__", "pipekit")
            if module.startswith("pipekit"):
                assert module == "pipekit", f"{name} reports {module}"

    def test_spec_names(self) -> None:
        """The names the core issue names as the contract all exist."""
        contract = [
            "Stage", "Validates", "RollsBack", "BaseStage", "stage", "Key", "StageContext",
            "Pipeline", "AtomicPipeline", "WorkflowPipeline", "RetryPolicy", "ExponentialBackoff",
            "PipelineRequest", "RequestOptions", "PipelineResponse", "StageResult", "Status",
            "PipekitError", "ValidationError", "PipelineDefinitionError", "StageFailedError",
            "StageTimeoutError", "RollbackError", "ContextConflictError", "PipelineCancelledError",
            "Engine", "ExecutionHandle", "PipelineMetrics", "run",
            "PipelineStarted", "StageStarted", "StageRetrying", "StageSucceeded", "StageFailed",
            "StageSkipped", "RollbackStarted", "StageRolledBack", "PipelineFinished",
        ]  # fmt: skip
        assert [name for name in contract if name not in pk.__all__] == []

    def test_error_tree(self) -> None:
        """Every error derives from PipekitError, with the builtins callers expect."""
        for name in pk.__all__:
            obj = getattr(pk, name)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                assert issubclass(obj, pk.PipekitError), name
        assert issubclass(pk.ValidationError, ValueError)
        assert issubclass(pk.PipelineDefinitionError, ValueError)
        assert issubclass(pk.StageTimeoutError, TimeoutError)
        assert issubclass(pk.StageTimeoutError, pk.StageFailedError)
        assert issubclass(pk.PipelineTimeoutError, TimeoutError)
        assert issubclass(pk.RollbackError, ExceptionGroup)

    def test_pipeline_is_a_stage(self) -> None:
        """A pipeline satisfies the Stage protocol, so it nests."""
        assert isinstance(pk.Pipeline("inner"), pk.Stage)

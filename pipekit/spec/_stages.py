"""The stages a pipeline file needs beyond `CommandStage`: several commands as one stage, and a checkout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from pipekit._context import StageContext
from pipekit._errors import PipelineDefinitionError, ValidationError
from pipekit._stage import BaseStage
from pipekit.ci._command import CommandResult, CommandStage

__all__ = ["CheckoutStage", "StepsStage"]


def _check_commands(name: str, what: str, commands: Sequence[CommandStage]) -> tuple[CommandStage, ...]:
    if isinstance(commands, CommandStage) or not all(isinstance(c, CommandStage) for c in commands):
        raise PipelineDefinitionError(f"stage {name!r}: {what} must be a list of pipekit.ci.CommandStage")
    return tuple(commands)


class StepsStage(BaseStage):
    """Several commands run one after another as one stage.

    Each step is a [`CommandStage`][pipekit.ci.CommandStage] whose command
    runs with its own settings (shell, cwd, env, success codes) and the
    stage's context; the first step that fails fails the stage, and the
    steps after it do not run. Retries and timeouts apply to the whole
    stage: a retry starts again from the first step. Rolling back runs the
    ``rollback`` commands in order.

    This is what a ``steps`` list of a pipeline file becomes.

    Args:
        name: The stage's name.
        steps: The commands, in order (at least one).
        rollback: Commands run in order to undo the stage.
        description: What the stage does, for displays.

    Raises:
        PipelineDefinitionError: For an empty ``steps`` or something that is
            not a `CommandStage`.
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[CommandStage],
        *,
        rollback: Sequence[CommandStage] = (),
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineDefinitionError(f"a stage needs a non-empty string name, got {name!r}")
        super().__init__(name)
        self.steps = _check_commands(name, "steps", steps)
        if not self.steps:
            raise PipelineDefinitionError(f"stage {name!r}: steps is empty")
        self.rollback_steps = _check_commands(name, "rollback", rollback)
        self.description = description
        # Without rollback commands there is nothing to undo: say so to the runner.
        self._pipekit_rolls_back = bool(self.rollback_steps)

    def validate(self, ctx: StageContext) -> None:
        """Validate every step and rollback command (references; executables in dry runs).

        Raises:
            ValidationError: Listing every problem.
        """
        errors: list[ValidationError] = []
        for command in (*self.steps, *self.rollback_steps):
            try:
                command.validate(ctx)
            except ValidationError as exc:
                errors.extend(exc.errors or (exc,))
        if errors:
            raise ValidationError("; ".join(map(str, errors)), stage=self.name, errors=errors)

    async def execute(self, ctx: StageContext) -> Any:
        """Run the steps in order and return their results (a list of `CommandResult`).

        Raises:
            pipekit.ci.CommandError: From the first step that fails.
        """
        return [await step.run(ctx) for step in self.steps]

    async def rollback(self, ctx: StageContext) -> None:
        """Run the rollback commands in order.

        Raises:
            pipekit.ci.CommandError: From the first one that fails.
        """
        for command in self.rollback_steps:
            await command.run(ctx)

    def __repr__(self) -> str:
        return f"<StepsStage {self.name!r}: {len(self.steps)} steps>"


class CommandWithRollbacks(StepsStage):
    """One command with several rollback commands: its output is the command's result, not a list."""

    async def execute(self, ctx: StageContext) -> CommandResult:
        """Run the command and return its result."""
        return await self.steps[0].run(ctx)


class CheckoutStage(BaseStage):
    """Clone a git repository into a fresh workspace: ``git clone --depth 1 -- URL WORKSPACE``.

    The workspace is deleted first, so every run starts from a clean clone.
    pipekit refuses (in validation too) to delete a workspace that is the
    current directory, one of its parents, the home directory or a
    filesystem root, or a non-empty directory that is not a git clone (no
    ``.git``): a mistyped ``workspace`` must not wipe your sources. The clone
    runs as a [`CommandStage`][pipekit.ci.CommandStage] (``${NAME}`` in the
    URL expanded, output streamed, ``git`` checked in dry runs); its result
    is the stage's output.

    This is the first stage of a pipeline file with a ``git_repository``.

    Args:
        repository: The repository URL.
        workspace: The directory to clone into.
        name: The stage's name.
        depth: How many commits of history to fetch.

    Raises:
        PipelineDefinitionError: For an empty repository or an invalid depth.
    """

    def __init__(
        self,
        repository: str,
        workspace: str | os.PathLike[str],
        *,
        name: str = "checkout",
        depth: int = 1,
    ) -> None:
        super().__init__(name)
        if not isinstance(repository, str) or not repository.strip():
            raise PipelineDefinitionError(f"stage {name!r}: the repository URL is empty")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise PipelineDefinitionError(f"stage {name!r}: depth must be an integer >= 1, got {depth!r}")
        self.repository = repository
        self.workspace = Path(workspace)
        self.clone = CommandStage(
            name,
            ["git", "clone", "--depth", str(depth), "--", repository, os.fspath(self.workspace)],
            description=f"clone {repository}",
        )

    def validate(self, ctx: StageContext) -> None:
        """Refuse a dangerous workspace; check the URL's references (and ``git``, in dry runs).

        Raises:
            ValidationError: Naming the problem.
        """
        problem = _unsafe_workspace(self.workspace)
        if problem is not None:
            raise ValidationError(f"stage {self.name!r}: {problem}", stage=self.name)
        self.clone.validate(ctx)

    async def execute(self, ctx: StageContext) -> CommandResult:
        """Delete the workspace and clone the repository into it.

        Raises:
            ValidationError: If the workspace is one pipekit refuses to delete.
            pipekit.ci.CommandError: If the clone fails.
        """
        problem = await anyio.to_thread.run_sync(_wipe, self.workspace)
        if problem is not None:
            raise ValidationError(f"stage {self.name!r}: {problem}", stage=self.name)
        return await self.clone.run(ctx)

    def __repr__(self) -> str:
        return f"<CheckoutStage {self.name!r}: {self.repository!r} -> {os.fspath(self.workspace)!r}>"


def _unsafe_workspace(workspace: Path) -> str | None:
    """Why deleting ``workspace`` would be a disaster, or None."""
    where = workspace.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents or where == Path.home().resolve() or where.parent == where:
        return (
            f"refusing to delete the workspace {os.fspath(workspace)!r}: it is the current directory, "
            "one of its parents, the home directory or a filesystem root"
        )
    if where.is_dir() and not (where / ".git").exists() and any(where.iterdir()):
        return (
            f"refusing to delete the workspace {os.fspath(workspace)!r}: it holds files but is not a git clone "
            "(no .git); remove it yourself or choose another workspace"
        )
    return None


def _wipe(workspace: Path) -> str | None:
    """Delete ``workspace`` (and create its parent), unless `_unsafe_workspace` objects: then say why."""
    problem = _unsafe_workspace(workspace)
    if problem is not None:
        return problem
    if workspace.is_symlink() or workspace.is_file():
        workspace.unlink()
    elif workspace.exists():
        shutil.rmtree(workspace)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    return None

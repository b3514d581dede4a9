"""From text to a [`Pipeline`][pipekit.Pipeline]: `load`, `loads`, `parse` and `build`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipekit._errors import PipelineDefinitionError
from pipekit._pipeline import Pipeline, Validator
from pipekit._policy import RetryPolicy
from pipekit._stage import Stage
from pipekit.ci._command import CommandStage
from pipekit.ci._languages import DockerBuildStage
from pipekit.ci._template import Secret
from pipekit.ci._validators import EnvVarValidator, Tool, ToolValidator

from ._check import check, dependencies
from ._decode import decode
from ._errors import SpecError
from ._expr import compile_condition
from ._model import EnvValueSpec, PipelineSpec, StageSpec, StepSpec, seconds
from ._source import Document, Format, read_document
from ._stages import CheckoutStage, CommandWithRollbacks, StepsStage

__all__ = ["build", "load", "loads", "parse"]

_SUFFIXES: dict[str, Format] = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def load(path: str | os.PathLike[str]) -> Pipeline:
    """Read a pipeline file and return the pipeline it describes.

    The format follows the suffix: ``.yaml`` / ``.yml`` or ``.json``.

    Args:
        path: The file.

    Returns:
        The pipeline.

    Raises:
        SpecError: For an unknown suffix, text that is not UTF-8, or any
            problem of the file (every problem is listed, with its line).
        OSError: If the file cannot be read.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    format = _SUFFIXES.get(suffix)  # noqa: A001 - the documented name
    if format is None:
        raise SpecError(f"unknown file type {suffix or source!r} (expected .yaml, .yml or .json)", source=source)
    data = Path(source).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", source=source) from None
    return loads(text, format=format, source=source)


def loads(text: str, *, format: Format = "yaml", source: str = "<string>") -> Pipeline:  # noqa: A002 - the documented name
    """Return the pipeline a pipeline file's text describes.

    Args:
        text: The text.
        format: ``"yaml"`` or ``"json"``.
        source: The name errors give the text (a file name).

    Returns:
        The pipeline.

    Raises:
        SpecError: Listing every problem, each with its field path and line.
    """
    document = read_document(text, format=format, source=source)
    return _build(_parse(document), document)


def parse(text: str, *, format: Format = "yaml", source: str = "<string>") -> PipelineSpec:  # noqa: A002 - the documented name
    """Check a pipeline file's text and return its typed model, without building the pipeline.

    Args:
        text: The text.
        format: ``"yaml"`` or ``"json"``.
        source: The name errors give the text (a file name).

    Returns:
        The spec.

    Raises:
        SpecError: Listing every problem, each with its field path and line.
    """
    return _parse(read_document(text, format=format, source=source))


def build(spec: PipelineSpec) -> Pipeline:
    """Return the pipeline a spec describes (a spec made in code is checked first).

    Args:
        spec: The spec.

    Returns:
        The pipeline.

    Raises:
        SpecError: Listing every problem of the spec, each with its field path.
    """
    if not isinstance(spec, PipelineSpec):
        raise TypeError(f"build() takes a pipekit.spec.PipelineSpec, got {type(spec).__name__}")
    document = Document(source="<spec>", data=None)
    problems = check(spec, document)
    if problems:
        raise SpecError.aggregate(problems)
    return _build(spec, document)


def _parse(document: Document) -> PipelineSpec:
    spec = decode(document)
    problems = check(spec, document)
    if problems:
        raise SpecError.aggregate(problems)
    return spec


def _build(spec: PipelineSpec, document: Document) -> Pipeline:
    """The pipeline of a checked spec; the builder's errors are located at their stage."""
    builder = _Builder(spec)
    pipeline = Pipeline(spec.name)
    if spec.variables:
        pipeline = pipeline.with_variables(spec.variables)
    if spec.timeout is not None:
        pipeline = pipeline.with_timeout(seconds(spec.timeout))
    if spec.git_repository is not None:
        pipeline = pipeline.add_stage(CheckoutStage(spec.git_repository, builder.workspace), depends_on=())
    for i, (stage, deps) in enumerate(zip(spec.stages, dependencies(spec), strict=True)):
        try:
            pipeline = builder.add(pipeline, stage, deps)
        except (PipelineDefinitionError, ValueError, TypeError) as exc:
            raise document.error(("stages", i), str(exc)) from None
    validators = builder.validators()
    if validators:
        pipeline = pipeline.with_validators(*validators)
    try:
        pipeline.check()
    except PipelineDefinitionError as exc:  # pragma: no cover - check() found every such problem first
        raise document.error(("stages",), str(exc)) from None
    return pipeline


def default_workspace(name: str) -> str:
    """Where a pipeline named ``name`` clones its repository by default: ``.pipekit/workspace/NAME``."""
    return os.path.join(".pipekit", "workspace", re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "pipeline")


class _Builder:
    """Turns each stage of a checked spec into a pipekit stage."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.workspace = spec.workspace if spec.workspace is not None else default_workspace(spec.name)
        self.from_env: list[str] = []  # variables env values are read from

    def add(self, pipeline: Pipeline, spec: StageSpec, deps: tuple[str, ...]) -> Pipeline:
        stage = self.stage(spec)
        options: dict[str, Any] = {
            "retry": _retry(spec),
            "timeout": None if spec.timeout is None else seconds(spec.timeout),
            "depends_on": deps,
            "continue_on_error": spec.continue_on_error,
        }
        if spec.when is not None:
            return pipeline.add_conditional_stage(stage, compile_condition(spec.when), **options)
        return pipeline.add_stage(stage, **options)

    def stage(self, spec: StageSpec) -> Stage:
        settings: dict[str, Any] = {
            "cwd": self.cwd(spec),
            "env": self.env(spec.env),
            "success_codes": spec.success_codes,
        }
        rollback = _rollback_commands(spec)
        if spec.steps is not None:
            steps = []
            for j, step in enumerate(spec.steps):
                step_command, shell = _step_command(step, spec.shell)
                steps.append(
                    CommandStage(f"{spec.name}: {_step_label(step, j)}", step_command, shell=shell, **settings)
                )
            undo = [
                CommandStage(f"{spec.name}: rollback {j + 1}", command, shell=spec.shell, **settings)
                for j, command in enumerate(rollback)
            ]
            return StepsStage(spec.name, steps, rollback=undo, description=spec.description)
        if len(rollback) <= 1:
            return _main_stage(spec, settings, rollback[0] if rollback else None)
        undo = [
            CommandStage(f"{spec.name}: rollback {j + 1}", c, shell=spec.shell, **settings)
            for j, c in enumerate(rollback)
        ]
        main = _main_stage(spec, settings, None)
        return CommandWithRollbacks(spec.name, [main], rollback=undo, description=spec.description)

    def cwd(self, spec: StageSpec) -> str | None:
        if self.spec.git_repository is None:
            return spec.cwd
        return self.workspace if spec.cwd is None else os.path.join(self.workspace, spec.cwd)

    def env(self, env: Mapping[str, str | int | float | bool | EnvValueSpec]) -> dict[str, str | Secret]:
        result: dict[str, str | Secret] = {}
        for key, value in env.items():
            if not isinstance(value, EnvValueSpec):
                result[key] = _text(value)
                continue
            if value.from_env is not None:
                self.from_env.append(value.from_env)
                found = os.environ.get(value.from_env)
                if found is None:
                    continue  # the pre-flight check names it
                text = found
            else:
                text = _text(value.value)
            result[key] = Secret(text) if value.secret else text
        return result

    def validators(self) -> list[Validator]:
        found: list[Validator] = []
        declared = self.spec.validators
        if declared is not None and declared.env:
            found.append(EnvVarValidator(declared.env))
        if declared is not None and declared.tools:
            found.append(
                ToolValidator(
                    [Tool(t) if isinstance(t, str) else Tool(t.name, min_version=t.min_version) for t in declared.tools]
                )
            )
        if self.from_env:
            # Values were read when the file was loaded: check that environment, not the one of the run.
            names = list(dict.fromkeys(self.from_env))
            snapshot = {n: os.environ[n] for n in names if n in os.environ}
            found.append(EnvVarValidator(names, env=snapshot))
        return found


def _text(value: str | int | float | bool | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _retry(spec: StageSpec) -> RetryPolicy | None:
    retry = spec.retry
    if retry is None:
        return None
    return RetryPolicy(
        max_attempts=retry.max_attempts,
        initial_delay=seconds(retry.delay),
        max_delay=seconds(retry.max_delay),
        multiplier=retry.backoff,
        jitter=0.0,
    )


def _main_stage(spec: StageSpec, settings: dict[str, Any], rollback: str | Sequence[str] | None) -> CommandStage:
    """The command stage of a stage without steps: its command, else ``docker build`` or ``kubectl apply``."""
    if spec.description:
        settings = {**settings, "description": spec.description}
    if spec.command is not None:  # a Run stage, or a Build or Deploy stage of the flat form
        return CommandStage(spec.name, spec.command, shell=spec.shell, rollback_command=rollback, **settings)
    if spec.type == "Build":
        assert spec.tag is not None
        dockerfile, context = spec.dockerfile or "Dockerfile", spec.context or "."
        return DockerBuildStage(spec.tag, dockerfile, context, name=spec.name, rollback_command=rollback, **settings)
    if spec.type == "Deploy":
        assert spec.manifest is not None
        command = ["kubectl", "apply", "-f", spec.manifest]
        if spec.cluster is not None:
            command += ["--context", spec.cluster]
        if spec.namespace is not None:
            command += ["--namespace", spec.namespace]
        return CommandStage(spec.name, command, rollback_command=rollback, **settings)
    raise AssertionError(f"unreachable: a checked {spec.type} stage has a command")  # pragma: no cover


def _rollback_commands(spec: StageSpec) -> list[str | Sequence[str]]:
    if spec.rollback is None:
        return []
    return [spec.rollback] if isinstance(spec.rollback, str) else list(spec.rollback)


def _step_label(step: str | StepSpec, index: int) -> str:
    if isinstance(step, StepSpec) and step.name is not None:
        return step.name
    return f"step {index + 1}"


def _step_command(step: str | StepSpec, shell: bool) -> tuple[str | Sequence[str], bool]:
    if isinstance(step, str):
        return step, shell
    if step.script is not None:
        return step.script, True
    assert step.command is not None
    return step.command, shell

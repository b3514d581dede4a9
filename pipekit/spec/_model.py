"""The typed model of a pipeline file: frozen attrs values that msgspec decodes into.

The model is the format's single source of truth: `pipekit.spec.parse`
decodes into it, and `pipekit.spec.json_schema` is generated from it (the
``Attributes:`` sections below become the schema's field descriptions).
Shapes and types live here; rules across fields (a Run stage needs a
command or steps, names are unique, conditions are valid...) are checked by
`pipekit.spec._check`.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Final, Literal

import attrs
from msgspec import Meta

__all__ = [
    "DURATION_PATTERN",
    "EnvValueSpec",
    "PipelineSpec",
    "RetrySpec",
    "StageSpec",
    "StepSpec",
    "ToolSpec",
    "ValidatorsSpec",
    "seconds",
]

#: A duration as a string: ``"90s"``, ``"5m"``, ``"1h30m"``, ``"250ms"`` (or a bare number, ``"30"``).
DURATION_PATTERN: Final = r"^(?:(?:\d+(?:\.\d+)?(?:ms|h|m|s))+|\d+(?:\.\d+)?)$"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)?")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}

# ``extra`` marks the fields whose errors say "expected a number of seconds".
_DurationText = Annotated[str, Meta(pattern=DURATION_PATTERN)]
#: Seconds > 0, as a number or a duration string.
Seconds = Annotated[
    Annotated[float, Meta(gt=0)] | _DurationText,
    Meta(description='Seconds, as a number or a string like "90s", "5m", "1h30m"', extra={"kind": "seconds"}),
]
#: Seconds >= 0, as a number or a duration string.
Delay = Annotated[
    Annotated[float, Meta(ge=0)] | _DurationText,
    Meta(description='Seconds, as a number or a string like "500ms", "10s", "1m"', extra={"kind": "delay"}),
]
NonEmpty = Annotated[str, Meta(min_length=1)]
#: A command: a string split like a shell would (or run by ``sh -c`` with ``shell: true``), or a list of arguments.
Command = NonEmpty | Annotated[tuple[str, ...], Meta(min_length=1)]
#: A variable's value.
Scalar = str | int | float | bool
StageType = Literal["Run", "Build", "Deploy"]


def seconds(value: float | str) -> float:
    """A `Seconds` / `Delay` value in seconds: numbers as they are, strings like ``"1h30m"`` summed.

    Raises:
        ValueError: For a string that is not a duration.
    """
    if not isinstance(value, str):
        return float(value)
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value))


@attrs.frozen(kw_only=True)
class RetrySpec:
    """How a stage is retried: exponential back-off without jitter.

    The delay before attempt ``n + 1`` is ``min(delay * backoff ** (n - 1), max_delay)``.

    Attributes:
        max_attempts: Attempts in total, the first included (1 disables retrying).
        delay: Seconds before the second attempt.
        backoff: Growth factor of the delay per attempt (at least 1).
        max_delay: Upper bound for any one delay, in seconds.
    """

    max_attempts: Annotated[int, Meta(ge=1)] = 3
    delay: Delay = 1.0
    backoff: Annotated[float, Meta(ge=1)] = 2.0
    max_delay: Delay = 30.0


@attrs.frozen(kw_only=True)
class EnvValueSpec:
    """An environment value given as a mapping: a secret, or read from pipekit's own environment.

    Give either ``value`` or ``from_env``.

    Attributes:
        value: The value.
        from_env: Read the value from this variable of pipekit's environment
            when the file is loaded.
        secret: Mask the value (as ``***``) wherever pipekit shows text.
    """

    value: Scalar | None = None
    from_env: NonEmpty | None = None
    secret: bool = False


#: An environment value: plain scalars are turned into strings.
EnvEntry = str | int | float | bool | EnvValueSpec


@attrs.frozen(kw_only=True)
class StepSpec:
    """One step of a stage with ``steps``: a command, or a shell script.

    Give either ``command`` or ``script``.

    Attributes:
        name: A label for the step, used in messages.
        command: The command: a string (split like a shell would, unless the
            stage sets ``shell: true``) or a list of arguments.
        script: A shell script (several lines allowed), run with ``sh -c``.
    """

    name: NonEmpty | None = None
    command: Command | None = None
    script: NonEmpty | None = None


@attrs.frozen(kw_only=True)
class StageSpec:
    """A stage: a command (Run), a ``docker build`` (Build) or a ``kubectl apply`` (Deploy).

    Attributes:
        name: The stage's name, unique in the pipeline.
        type: Run (``command`` or ``steps``), Build (``docker build``, or
            its ``command``) or Deploy (``kubectl apply``, or its ``command``).
        description: What the stage does, for displays.
        command: The command: a string (split like a shell would, or run by
            ``sh -c`` with ``shell: true``) or a list of arguments. A Build or
            Deploy stage with a command runs it instead of ``docker build`` /
            ``kubectl apply`` (the flat form).
        steps: Commands run in order as one stage (instead of ``command``);
            each is a command string or a mapping with ``command`` or ``script``.
        shell: Run command strings through ``/bin/sh -c`` (pipes, globs, ``&&``).
        cwd: The working directory; relative to the workspace when the
            pipeline has a ``git_repository``.
        env: Environment variables to set: a string (numbers and booleans
            are converted), or a mapping with ``value`` or ``from_env`` and ``secret``.
        success_codes: Exit statuses that count as success.
        depends_on: Stages this one waits for; by default the stage listed
            before it (none when the pipeline is ``parallel``).
        when: A condition; the stage is skipped when it is false
            (``variables.env == "prod"``).
        continue_on_error: Record a failure and go on; stages depending on
            this one are skipped.
        retry: Retry a failing stage.
        timeout: Seconds each attempt may take.
        rollback: Commands run, in order, to undo the stage when a later
            stage fails: one command string, or a list of commands.
        tag: Build: the image tag (``docker build -t``).
        dockerfile: Build: the Dockerfile (``-f``; ``Dockerfile`` by default).
        context: Build: the build context (``.`` by default).
        manifest: Deploy: the manifest file or directory (``kubectl apply -f``).
        cluster: Deploy: the kubeconfig context (``--context``).
        namespace: Deploy: the namespace (``--namespace``).
    """

    name: NonEmpty
    type: StageType = "Run"
    description: str = ""
    command: Command | None = None
    steps: Annotated[tuple[NonEmpty | StepSpec, ...], Meta(min_length=1)] | None = None
    shell: bool = False
    cwd: NonEmpty | None = None
    env: dict[str, EnvEntry] = attrs.field(factory=dict)
    success_codes: tuple[int, ...] = (0,)
    depends_on: NonEmpty | tuple[NonEmpty, ...] | None = None
    when: str | None = None
    continue_on_error: bool = False
    retry: RetrySpec | None = None
    timeout: Seconds | None = None
    rollback: NonEmpty | tuple[Command, ...] | None = None
    tag: NonEmpty | None = None
    dockerfile: NonEmpty | None = None
    context: NonEmpty | None = None
    manifest: NonEmpty | None = None
    cluster: NonEmpty | None = None
    namespace: NonEmpty | None = None


@attrs.frozen(kw_only=True)
class ToolSpec:
    """A tool the pipeline needs on PATH, optionally with a minimum version.

    Attributes:
        name: The executable (``go``, ``docker``, ``kubectl``...).
        min_version: The oldest acceptable version (``"1.21"``).
    """

    name: NonEmpty
    min_version: NonEmpty | None = None


@attrs.frozen(kw_only=True)
class ValidatorsSpec:
    """Pre-flight checks, run before any stage (and in dry runs).

    Attributes:
        env: Environment variables that must be set and non-empty.
        tools: Tools that must be on PATH: names, or mappings with ``name``
            and ``min_version``.
    """

    env: tuple[NonEmpty, ...] = ()
    tools: tuple[NonEmpty | ToolSpec, ...] = ()


@attrs.frozen(kw_only=True)
class PipelineSpec:
    """A pipeline file: a name and its stages, plus options.

    The flat form uses ``name``, ``git_repository``, ``parallel`` and stages
    with ``name``, ``type``, ``command`` and ``timeout``; the full form adds
    the rest.

    Attributes:
        name: The pipeline's name.
        description: What the pipeline does.
        git_repository: Clone this repository (``git clone --depth 1``) into
            the workspace in a first stage, ``checkout``; every stage then runs
            in the workspace.
        workspace: Where the repository is cloned (``.pipekit/workspace/NAME``
            by default). It is wiped before each clone.
        parallel: Run all stages at once (stages without ``depends_on``
            are roots) instead of one after another.
        variables: Values stages read as ``${NAME}`` in commands and
            ``variables.NAME`` in conditions.
        inputs: Names of request input values the stages read (``${NAME}``,
            ``input.NAME``); an input value wins over a variable of the same name.
        validators: Pre-flight checks of the environment and tools.
        timeout: Seconds the whole run may take.
        stages: The stages, in order.
    """

    name: NonEmpty
    description: str = ""
    git_repository: NonEmpty | None = None
    workspace: NonEmpty | None = None
    parallel: bool = False
    variables: dict[str, Scalar] = attrs.field(factory=dict)
    inputs: tuple[NonEmpty, ...] = ()
    validators: ValidatorsSpec | None = None
    timeout: Seconds | None = None
    stages: Annotated[tuple[StageSpec, ...], Meta(min_length=1)]


#: Every class of the model, for the schema's descriptions.
MODEL_CLASSES: Final = (PipelineSpec, StageSpec, StepSpec, RetrySpec, EnvValueSpec, ValidatorsSpec, ToolSpec)

# msgspec reads the annotations at run time, in the module named by __module__; once the classes are
# re-exported as pipekit.spec.X, the aliases above are not there: resolve the annotations here, now.
for _cls in MODEL_CLASSES:
    _cls.__annotations__ = typing.get_type_hints(_cls, include_extras=True)
del _cls

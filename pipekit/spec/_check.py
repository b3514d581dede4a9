"""The rules of a pipeline file that span fields: each broken rule is one problem at its field.

Types and shapes are checked while decoding (`pipekit.spec._decode`); this
module checks what a valid spec must also satisfy: a Run stage has a command
or steps (not both), Build and Deploy stages have their own command or what
``docker build`` / ``kubectl apply`` needs, stage names are unique,
dependencies exist and have no cycle, conditions are in the expression
language and read known names, ``${NAME}`` references name a variable or an
input, durations are positive.
"""

from __future__ import annotations

import graphlib
import shlex
from collections.abc import Iterator, Sequence
from typing import Final

from pipekit.ci._template import check_template, references
from pipekit.ci._validators import Tool

from ._decode import describe_value, suggest
from ._errors import SpecError
from ._expr import ExpressionError, compile_condition
from ._model import EnvValueSpec, PipelineSpec, StageSpec, StepSpec, seconds
from ._source import Document, FieldPath

__all__ = ["BUILD_FIELDS", "CHECKOUT", "DEPLOY_FIELDS", "check", "dependencies"]

#: The name of the stage that clones ``git_repository``.
CHECKOUT: Final = "checkout"
BUILD_FIELDS: Final = ("tag", "dockerfile", "context")
DEPLOY_FIELDS: Final = ("manifest", "cluster", "namespace")
_OWN_COMMAND: Final = {"Build": "docker build", "Deploy": "kubectl apply"}


def depends_on(stage: StageSpec) -> tuple[str, ...] | None:
    """A stage's ``depends_on`` as a tuple (a single name allowed), or None when absent."""
    if stage.depends_on is None:
        return None
    return (stage.depends_on,) if isinstance(stage.depends_on, str) else stage.depends_on


def dependencies(spec: PipelineSpec) -> list[tuple[str, ...]]:
    """What each stage waits for, the defaults applied.

    A stage without ``depends_on`` waits for the stage listed before it (or
    for nothing: the first stage, or any stage of a ``parallel`` pipeline).
    With a ``git_repository``, a stage that would wait for nothing waits for
    ``checkout``.
    """
    resolved: list[tuple[str, ...]] = []
    for i, stage in enumerate(spec.stages):
        deps = depends_on(stage)
        if deps is None:
            deps = () if spec.parallel or i == 0 else (spec.stages[i - 1].name,)
        if not deps and spec.git_repository is not None:
            deps = (CHECKOUT,)
        resolved.append(deps)
    return resolved


def check(spec: PipelineSpec, document: Document) -> list[SpecError]:
    """Every problem of ``spec``, each at its field's path and line (in file order)."""
    checker = _Checker(spec, document)
    checker.run()
    return sorted(checker.problems, key=lambda p: p.line or 0)


class _Checker:
    def __init__(self, spec: PipelineSpec, document: Document) -> None:
        self.spec = spec
        self.document = document
        self.problems: list[SpecError] = []
        self.known = {*spec.variables, *spec.inputs}

    def problem(self, path: FieldPath, message: str) -> None:
        self.problems.append(self.document.error(path, message))

    def run(self) -> None:
        spec = self.spec
        for name in spec.variables:
            if not name.isidentifier():
                self.problem(("variables", name), "variable names must be identifiers (letters, digits and _)")
        for i, name in enumerate(spec.inputs):
            if not name.isidentifier():
                self.problem(("inputs", i), f"input names must be identifiers (letters, digits and _), got {name!r}")
        self.duration(("timeout",), spec.timeout)
        if spec.workspace is not None and references(spec.workspace):
            self.problem(("workspace",), "the workspace cannot use ${NAME} references")
        if spec.git_repository is not None:
            if spec.git_repository.startswith("-"):
                self.problem(("git_repository",), f"expected a repository URL, got {spec.git_repository!r}")
            self.templates(("git_repository",), spec.git_repository)
        self.validators()
        names: dict[str, int] = {}
        for i, stage in enumerate(spec.stages):
            path: FieldPath = ("stages", i)
            if stage.name in names:
                self.problem((*path, "name"), f"duplicate stage name {stage.name!r} (also stages[{names[stage.name]}])")
            else:
                names[stage.name] = i
            if stage.name == CHECKOUT and spec.git_repository is not None:
                self.problem((*path, "name"), f"the stage name {CHECKOUT!r} is taken by the clone of git_repository")
            self.stage(path, stage)
        self.graph()
        # A condition may read the clone's result too (outputs.checkout).
        known = set(names) | ({CHECKOUT} if spec.git_repository is not None else set())
        for i, stage in enumerate(spec.stages):
            if stage.when is not None:
                self.condition(("stages", i, "when"), stage.when, known)

    # -- fields -------------------------------------------------------------

    def duration(self, path: FieldPath, value: float | str | None, *, positive: bool = True) -> None:
        if value is None:
            return
        amount = seconds(value)
        if amount <= 0 if positive else amount < 0:
            bound = "> 0" if positive else ">= 0"
            self.problem(path, f"expected a number of seconds {bound}, got {describe_value(value)}")

    def templates(self, path: FieldPath, text: str) -> None:
        """Problems with the ``${NAME}`` references of ``text``."""
        for problem in check_template(text):
            self.problem(path, problem)
        for name in references(text):
            if name.isidentifier() and name not in self.known:
                guess = suggest(name, sorted(self.known))
                hint = (
                    f" (did you mean ${{{guess}}}?)"
                    if guess
                    else f"; declare it under variables or inputs, or write $${{{name}}} for a literal"
                )
                self.problem(path, f"unknown variable ${{{name}}}{hint}")

    def command(self, path: FieldPath, command: str | Sequence[str], *, shell: bool) -> None:
        if isinstance(command, str):
            if not command.strip():
                self.problem(path, "the command is empty")
                return
            if not shell:
                try:
                    shlex.split(command)
                except ValueError as exc:
                    self.problem(path, f"cannot split the command like a shell would: {exc}")
            self.templates(path, command)
        else:
            for j, part in enumerate(command):
                self.templates((*path, j), part)

    def validators(self) -> None:
        validators = self.spec.validators
        if validators is None:
            return
        for i, name in enumerate(validators.env):
            if "=" in name:
                self.problem(("validators", "env", i), f"{name!r} is not an environment variable name")
        for i, tool in enumerate(validators.tools):
            if isinstance(tool, str):
                continue
            try:
                Tool(tool.name, min_version=tool.min_version)
            except ValueError as exc:
                field = "min_version" if tool.min_version is not None else "name"
                message = str(exc).removeprefix(f"Tool {tool.name!r}: ")
                self.problem(("validators", "tools", i, field), message)

    def stage(self, path: FieldPath, stage: StageSpec) -> None:
        self.kind(path, stage)
        if stage.command is not None:
            self.command((*path, "command"), stage.command, shell=stage.shell)
        for j, step in enumerate(stage.steps or ()):
            self.step((*path, "steps", j), step, shell=stage.shell)
        for j, command in enumerate(_rollback_commands(stage)):
            where = (*path, "rollback") if isinstance(stage.rollback, str) else (*path, "rollback", j)
            self.command(where, command, shell=stage.shell)
        for field in ("cwd", *BUILD_FIELDS, *DEPLOY_FIELDS):
            value = getattr(stage, field)
            if value is not None:
                self.templates((*path, field), value)
        for key, value in stage.env.items():
            self.env((*path, "env", key), key, value)
        self.duration((*path, "timeout"), stage.timeout)
        if stage.retry is not None:
            self.duration((*path, "retry", "delay"), stage.retry.delay, positive=False)
            self.duration((*path, "retry", "max_delay"), stage.retry.max_delay, positive=False)
        deps = depends_on(stage)
        if deps is not None and stage.name in deps:
            self.problem((*path, "depends_on"), f"stage {stage.name!r} depends on itself")

    def kind(self, path: FieldPath, stage: StageSpec) -> None:
        """The fields a stage of its type needs, and those it cannot have."""
        if stage.type == "Run":
            if stage.command is None and stage.steps is None:
                self.problem(path, "a Run stage needs a command or steps")
            elif stage.command is not None and stage.steps is not None:
                self.problem((*path, "steps"), "give either command or steps, not both")
        elif stage.command is not None:
            # The flat form: a Build or Deploy stage naming its own command runs it as a Run stage would.
            for field in BUILD_FIELDS if stage.type == "Build" else DEPLOY_FIELDS:
                if getattr(stage, field) is not None:
                    self.problem((*path, field), f"give either command or {field}, not both")
            if stage.steps is not None:
                self.problem((*path, "steps"), "give either command or steps, not both")
        else:
            needed = "tag" if stage.type == "Build" else "manifest"
            if getattr(stage, needed) is None:
                self.problem(path, f"a {stage.type} stage needs a {needed} (or a command)")
            if stage.steps is not None:
                self.problem((*path, "steps"), f"a {stage.type} stage runs one command; use a Run stage for steps")
            if stage.shell:
                self.problem(
                    (*path, "shell"),
                    f"shell needs a command ({stage.type} runs {_OWN_COMMAND[stage.type]} as arguments)",
                )
            for field in ("tag", "context", "manifest"):
                value = getattr(stage, field)
                if value is not None and value.startswith("-"):
                    self.problem((*path, field), f"{value!r} would be read as an option")
        for owner, fields in (("Build", BUILD_FIELDS), ("Deploy", DEPLOY_FIELDS)):
            if stage.type != owner:
                for field in fields:
                    if getattr(stage, field) is not None:
                        self.problem((*path, field), f"only {owner} stages take {field}")

    def step(self, path: FieldPath, step: str | StepSpec, *, shell: bool) -> None:
        if isinstance(step, str):
            self.command(path, step, shell=shell)
        elif (step.command is None) == (step.script is None):
            self.problem(path, "a step needs either command or script")
        elif step.command is not None:
            self.command((*path, "command"), step.command, shell=shell)
        elif step.script is not None:
            self.command((*path, "script"), step.script, shell=True)

    def env(self, path: FieldPath, key: str, value: str | int | float | bool | EnvValueSpec) -> None:
        if not key or "=" in key:
            self.problem(path, f"{key!r} is not an environment variable name")
        if isinstance(value, str):
            self.templates(path, value)
        elif isinstance(value, EnvValueSpec):
            if (value.value is None) == (value.from_env is None):
                self.problem(path, "give either value or from_env")
            elif value.from_env is not None and "=" in value.from_env:
                self.problem((*path, "from_env"), f"{value.from_env!r} is not an environment variable name")
            elif isinstance(value.value, str) and not value.secret:
                self.templates((*path, "value"), value.value)

    # -- across stages -------------------------------------------------------

    def graph(self) -> None:
        """Unknown dependencies, then cycles."""
        spec = self.spec
        names = [s.name for s in spec.stages]
        known = set(names) | ({CHECKOUT} if spec.git_repository is not None else set())
        unknown = False
        for i, stage in enumerate(spec.stages):
            deps = depends_on(stage) or ()
            for j, dep in enumerate(deps):
                if dep not in known:
                    unknown = True
                    guess = suggest(dep, sorted(known))
                    hint = f" (did you mean {guess!r}?)" if guess else ""
                    where = (
                        ("stages", i, "depends_on")
                        if isinstance(stage.depends_on, str)
                        else ("stages", i, "depends_on", j)
                    )
                    self.problem(where, f"unknown stage {dep!r}{hint}")
        clash = spec.git_repository is not None and CHECKOUT in names
        loops = any(s.name in (depends_on(s) or ()) for s in spec.stages)
        if unknown or clash or loops or len(set(names)) != len(names):
            return  # reported already; a graph of them would only repeat it
        graph = {name: set(deps) for name, deps in zip(names, dependencies(spec), strict=True)}
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as exc:
            cycle: list[str] = list(reversed(exc.args[1]))[:-1]  # each depends on the next
            # Blame the stage whose depends_on points forward in the file: that is what closed the cycle.
            index = {name: i for i, name in enumerate(names)}
            culprit = next(
                (
                    n
                    for n in cycle
                    if any(index.get(d, -1) >= index[n] for d in depends_on(spec.stages[index[n]]) or ())
                ),
                cycle[0],
            )
            start = cycle.index(culprit)
            ordered = [*cycle[start:], *cycle[:start], culprit]
            self.problem(("stages", index[culprit], "depends_on"), f"dependency cycle: {' -> '.join(ordered)}")

    def condition(self, path: FieldPath, text: str, stages: set[str]) -> None:
        try:
            condition = compile_condition(text)
        except ExpressionError as exc:
            self.problem(path, str(exc))
            return
        declared = {"variables": set(self.spec.variables), "input": set(self.spec.inputs), "outputs": stages}
        for ref in condition.references:
            choices = declared[ref.root]
            if not isinstance(ref.key, str) or ref.key in choices:
                continue
            guess = suggest(ref.key, sorted(choices))
            hint = f" (did you mean {ref.root}.{guess}?)" if guess else ""
            if ref.root == "variables":
                self.problem(path, f"unknown variable {ref.key!r}{hint}")
            elif ref.root == "input":
                self.problem(path, f"unknown input {ref.key!r}{hint}; declare it under inputs")
            else:
                self.problem(path, f"unknown stage {ref.key!r} in outputs{hint}")


def _rollback_commands(stage: StageSpec) -> Iterator[str | Sequence[str]]:
    if stage.rollback is None:
        return
    if isinstance(stage.rollback, str):
        yield stage.rollback
    else:
        yield from stage.rollback

"""pipekit.spec: pipeline files parsed into the typed model and built into pipelines; every bad input's message.

Running the pipelines a file describes (real commands) is tested in
``test_spec_run.py``; the ``when`` language in ``test_spec_expr.py``.
"""

from __future__ import annotations

import json
import pickle
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pipekit as pk
import pipekit.spec
from pipekit.ci import CommandStage, DockerBuildStage, EnvVarValidator, Secret, ToolValidator
from pipekit.spec import (
    CheckoutStage,
    EnvValueSpec,
    PipelineSpec,
    RetrySpec,
    SpecError,
    StageSpec,
    StepSpec,
    StepsStage,
    ToolSpec,
    ValidatorsSpec,
    build,
    json_schema,
    load,
    loads,
    parse,
)
from pipekit.spec.__main__ import main as schema_main
from pipekit.spec._expr import Condition
from pipekit.spec._schema import _DOCS_END as DOCS_END
from pipekit.spec._schema import _DOCS_START as DOCS_START
from pipekit.spec._schema import DOCS_PATH, SCHEMA_PATH, docs_with_schema, schema_text
from pipekit.spec._stages import CommandWithRollbacks

ROOT = Path(__file__).resolve().parent.parent

FLAT = """\
name: web-app
git_repository: https://example.com/web-app.git
parallel: false
stages:
  - name: test
    type: Run
    command: make test
    timeout: 300
  - name: image
    type: Build
    tag: web-app:latest
  - name: deploy
    type: Deploy
    manifest: k8s/
    timeout: 5m
"""

FULL = """\
name: release
description: Build, test and ship
variables:
  VERSION: "1.4.2"
  REPLICAS: 3
  PUSH: true
inputs: [target]
validators:
  env: [HOME]
  tools:
    - sh
    - {name: git, min_version: "2.0"}
timeout: 1h
stages:
  - name: lint
    command: [ruff, check, .]
  - name: unit
    depends_on: []
    steps:
      - make deps
      - {name: tests, command: "pytest -q"}
      - script: |
          echo one
          echo two
    retry: {max_attempts: 4, delay: 0, backoff: 3, max_delay: 10s}
    timeout: 90s
    env:
      PLAIN: value
      COUNT: 2
      DEBUG: false
      TOKEN: {value: s3cret, secret: true}
  - name: image
    type: Build
    depends_on: [lint, unit]
    tag: registry.example.com/app:${VERSION}
    dockerfile: docker/Dockerfile
    context: src
    rollback: docker rmi registry.example.com/app:${VERSION}
  - name: deploy
    type: Deploy
    manifest: k8s/${target}.yaml
    cluster: prod-eu
    namespace: shop
    when: variables.PUSH and input.target in ["prod", "staging"] and outputs.image.returncode == 0
    continue_on_error: true
    rollback:
      - kubectl rollout undo deployment/shop
      - [sh, -c, "echo rolled back"]
  - name: notify
    depends_on: deploy
    shell: true
    command: echo "done ${VERSION}" | cat
    cwd: /tmp
    success_codes: [0, 3]
    description: Tell everyone
"""


def error_of(text: str, *, format: str = "yaml") -> str:  # noqa: A002 - as loads() names it
    """The message of the SpecError loading ``text`` raises (source ``pipeline.yaml`` / ``.json``)."""
    with pytest.raises(SpecError) as info:
        loads(textwrap.dedent(text), format=format, source=f"pipeline.{format}")  # type: ignore[arg-type]
    return str(info.value)


def stage_entry(pipeline: pk.Pipeline, name: str) -> Any:
    """The pipeline's entry for stage ``name``."""
    return next(e for e in pipeline.entries if e.name == name)


class TestParse:
    def test_flat_form(self) -> None:
        """The flat form parses into the model; ``type`` defaults to Run."""
        spec = parse(FLAT)
        assert spec.name == "web-app"
        assert spec.git_repository == "https://example.com/web-app.git"
        assert spec.parallel is False
        assert [(s.name, s.type, s.timeout) for s in spec.stages] == [
            ("test", "Run", 300),
            ("image", "Build", None),
            ("deploy", "Deploy", "5m"),
        ]
        assert parse("name: x\nstages: [{name: a, command: ls}]").stages[0].type == "Run"

    def test_full_form(self) -> None:
        """Every field of the full form lands in the model."""
        spec = parse(FULL)
        assert spec.variables == {"VERSION": "1.4.2", "REPLICAS": 3, "PUSH": True}
        assert spec.inputs == ("target",)
        assert spec.validators == ValidatorsSpec(env=("HOME",), tools=("sh", ToolSpec(name="git", min_version="2.0")))
        assert spec.timeout == "1h"
        lint, unit, image, deploy, notify = spec.stages
        assert lint.command == ("ruff", "check", ".")
        assert unit.depends_on == ()
        assert unit.steps == (
            "make deps",
            StepSpec(name="tests", command="pytest -q"),
            StepSpec(script="echo one\necho two\n"),
        )
        assert unit.retry == RetrySpec(max_attempts=4, delay=0, backoff=3, max_delay="10s")
        assert unit.env["TOKEN"] == EnvValueSpec(value="s3cret", secret=True)
        assert (image.tag, image.dockerfile, image.context) == (
            "registry.example.com/app:${VERSION}",
            "docker/Dockerfile",
            "src",
        )
        assert (deploy.manifest, deploy.cluster, deploy.namespace, deploy.continue_on_error) == (
            "k8s/${target}.yaml",
            "prod-eu",
            "shop",
            True,
        )
        assert deploy.rollback == ("kubectl rollout undo deployment/shop", ("sh", "-c", "echo rolled back"))
        assert (notify.depends_on, notify.shell, notify.cwd, notify.success_codes) == ("deploy", True, "/tmp", (0, 3))

    def test_json_equals_yaml(self) -> None:
        """The same pipeline written as JSON parses into the same spec; a ``$schema`` key is allowed."""
        data = {"$schema": "./pipeline.schema.json", "name": "web-app", "stages": [{"name": "a", "command": "ls"}]}
        assert parse(json.dumps(data), format="json") == parse("name: web-app\nstages: [{name: a, command: ls}]")

    def test_anchors_and_merge_keys(self) -> None:
        """YAML anchors, aliases and merge keys work; the merged fields are still checked."""
        spec = parse("name: x\nstages:\n  - &base {name: a, command: ls, timeout: 30}\n  - <<: *base\n    name: b\n")
        assert [(s.name, s.command, s.timeout) for s in spec.stages] == [("a", "ls", 30), ("b", "ls", 30)]

    def test_dates_stay_strings(self) -> None:
        """A date-like value is a string, as a pipeline file means it (no timestamps)."""
        assert parse("name: x\nvariables: {RELEASED: 2024-01-02}\nstages: [{name: a, command: ls}]").variables == {
            "RELEASED": "2024-01-02"
        }

    @pytest.mark.parametrize(
        ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("42", 42)]
    )
    def test_durations(self, text: str, seconds: float) -> None:
        """Timeouts take numbers or duration strings."""
        pipeline = loads(f"name: x\nstages: [{{name: a, command: ls, timeout: '{text}'}}]")
        assert stage_entry(pipeline, "a").timeout == pytest.approx(seconds)


class TestBuild:
    def test_flat_sequence(self) -> None:
        """Stages run in order by default, after the checkout of git_repository, in its workspace."""
        pipeline = loads(FLAT)
        assert pipeline.stage_names == ("checkout", "test", "image", "deploy")
        assert [stage_entry(pipeline, n).depends_on for n in pipeline.stage_names] == [
            (),
            ("checkout",),
            ("test",),
            ("image",),
        ]
        checkout = stage_entry(pipeline, "checkout").stage
        assert isinstance(checkout, CheckoutStage)
        workspace = str(Path(".pipekit/workspace/web-app"))
        assert checkout.clone.command == (
            "git",
            "clone",
            "--depth",
            "1",
            "--",
            "https://example.com/web-app.git",
            workspace,
        )
        test = stage_entry(pipeline, "test").stage
        assert isinstance(test, CommandStage)
        assert (test.command, test.cwd) == (("make", "test"), workspace)
        assert stage_entry(pipeline, "test").timeout == 300
        assert stage_entry(pipeline, "deploy").timeout == 300

    def test_flat_form_build_and_deploy_commands(self) -> None:
        """In the flat form a Build or Deploy stage names its own command: it runs that (with shell, if asked)."""
        pipeline = loads(
            "name: x\n"
            "stages:\n"
            "  - {name: image, type: Build, command: docker build -t app ., timeout: 300}\n"
            "  - {name: ship, type: Deploy, shell: true, command: kubectl apply -f k8s/ && echo ok}\n"
        )
        image, ship = (stage_entry(pipeline, n).stage for n in ("image", "ship"))
        assert type(image) is CommandStage
        assert image.command == ("docker", "build", "-t", "app", ".")
        assert stage_entry(pipeline, "image").timeout == 300
        assert type(ship) is CommandStage
        assert (ship.command, ship.shell) == ("kubectl apply -f k8s/ && echo ok", True)

    def test_flat_parallel(self) -> None:
        """With ``parallel: true`` every stage without depends_on is a root (after checkout, if any)."""
        pipeline = loads("name: x\nparallel: true\nstages: [{name: a, command: ls}, {name: b, command: ls}]")
        assert [e.depends_on for e in pipeline.entries] == [(), ()]
        pipeline = loads(FLAT.replace("parallel: false", "parallel: true"))
        assert [e.depends_on for e in pipeline.entries] == [(), ("checkout",), ("checkout",), ("checkout",)]

    def test_workspace(self) -> None:
        """``workspace`` overrides the default; a stage's relative cwd is inside it; names are sanitised."""
        pipeline = loads(
            "name: my app/../x\n"
            "git_repository: https://example.com/x.git\n"
            "stages: [{name: a, command: ls, cwd: sub}, {name: b, command: ls, cwd: /abs}]\n"
        )
        assert stage_entry(pipeline, "checkout").stage.workspace == Path(".pipekit/workspace/my-app-x")
        assert stage_entry(pipeline, "a").stage.cwd == str(Path(".pipekit/workspace/my-app-x/sub"))
        assert stage_entry(pipeline, "b").stage.cwd == "/abs"
        pipeline = loads("name: x\ngit_repository: u\nworkspace: /tmp/ws\nstages: [{name: a, command: ls}]")
        assert stage_entry(pipeline, "a").stage.cwd == "/tmp/ws"

    def test_full_form(self) -> None:
        """Every field of the full form maps to the pipeline, its stages and their policies."""
        pipeline = loads(FULL)
        assert pipeline.stage_names == ("lint", "unit", "image", "deploy", "notify")
        assert dict(pipeline.variables) == {"VERSION": "1.4.2", "REPLICAS": 3, "PUSH": True}
        assert pipeline.timeout == 3600
        env_validator, tool_validator = pipeline.validators
        assert isinstance(env_validator, EnvVarValidator)
        assert env_validator.required == ("HOME",)
        assert isinstance(tool_validator, ToolValidator)
        assert [(t.name, t.min_version) for t in tool_validator.tools] == [("sh", None), ("git", "2.0")]

        assert [stage_entry(pipeline, n).depends_on for n in pipeline.stage_names] == [
            (),
            (),
            ("lint", "unit"),
            ("image",),
            ("deploy",),
        ]
        unit = stage_entry(pipeline, "unit")
        assert isinstance(unit.stage, StepsStage)
        assert [(s.command, s.shell) for s in unit.stage.steps] == [
            (("make", "deps"), False),
            (("pytest", "-q"), False),
            ("echo one\necho two\n", True),
        ]
        assert [s.name for s in unit.stage.steps] == ["unit: step 1", "unit: tests", "unit: step 3"]
        assert unit.stage.steps[0].env == {
            "PLAIN": "value",
            "COUNT": "2",
            "DEBUG": "false",
            "TOKEN": Secret("s3cret"),
        }
        assert isinstance(unit.stage.steps[0].env["TOKEN"], Secret)
        assert unit.retry == pk.RetryPolicy(max_attempts=4, initial_delay=0, max_delay=10, multiplier=3, jitter=0)
        assert unit.timeout == 90

        image = stage_entry(pipeline, "image").stage
        assert isinstance(image, DockerBuildStage)
        assert image.command == (
            "docker",
            "build",
            "-t",
            "registry.example.com/app:${VERSION}",
            "-f",
            "docker/Dockerfile",
            "src",
        )
        assert image.rollback_command == ("docker", "rmi", "registry.example.com/app:${VERSION}")

        deploy = stage_entry(pipeline, "deploy")
        assert isinstance(deploy.stage, CommandWithRollbacks)
        assert deploy.stage.steps[0].command == (
            "kubectl", "apply", "-f", "k8s/${target}.yaml", "--context", "prod-eu", "--namespace", "shop",
        )  # fmt: skip
        assert [c.command for c in deploy.stage.rollback_steps] == [
            ("kubectl", "rollout", "undo", "deployment/shop"),
            ("sh", "-c", "echo rolled back"),
        ]
        assert deploy.continue_on_error is True
        assert isinstance(deploy.when, Condition)

        notify = stage_entry(pipeline, "notify").stage
        assert isinstance(notify, CommandStage)
        assert (notify.command, notify.shell, notify.cwd) == ('echo "done ${VERSION}" | cat', True, "/tmp")
        assert (notify.success_codes, notify.description) == (frozenset({0, 3}), "Tell everyone")

    def test_no_rollback_is_not_a_rollback(self) -> None:
        """A stage without rollback commands tells the runner there is nothing to undo."""
        pipeline = loads("name: x\nstages: [{name: a, steps: [ls]}, {name: b, command: ls}]")
        for name in ("a", "b"):
            assert stage_entry(pipeline, name).stage._pipekit_rolls_back is False

    def test_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``from_env`` reads pipekit's environment when the file is loaded; a pre-flight check names missing ones."""
        monkeypatch.setenv("SPEC_TEST_TOKEN", "t0ken")
        monkeypatch.delenv("SPEC_TEST_MISSING", raising=False)
        pipeline = loads(
            textwrap.dedent(
                """\
                name: x
                stages:
                  - name: a
                    command: ls
                    env:
                      TOKEN: {from_env: SPEC_TEST_TOKEN, secret: true}
                      PLAIN: {from_env: SPEC_TEST_TOKEN}
                      OTHER: {from_env: SPEC_TEST_MISSING}
                """
            )
        )
        stage = stage_entry(pipeline, "a").stage
        assert stage.env == {"TOKEN": Secret("t0ken"), "PLAIN": "t0ken"}
        assert isinstance(stage.env["TOKEN"], Secret)
        (validator,) = pipeline.validators
        assert isinstance(validator, EnvVarValidator)
        assert validator.required == ("SPEC_TEST_TOKEN", "SPEC_TEST_MISSING")
        assert validator.env == {"SPEC_TEST_TOKEN": "t0ken"}

    def test_build_a_spec_made_in_code(self) -> None:
        """build() takes a spec made in code."""
        spec = PipelineSpec(name="x", stages=(StageSpec(name="a", command="ls"), StageSpec(name="b", command=("ls",))))
        pipeline = build(spec)
        assert isinstance(pipeline, pk.Pipeline)
        assert pipeline.stage_names == ("a", "b")

    def test_build_checks_a_spec_made_in_code(self) -> None:
        """build() checks a spec made in code: the errors have a path but no line."""
        spec = PipelineSpec(name="x", stages=(StageSpec(name="a"), StageSpec(name="b", command="ls", depends_on="c")))
        with pytest.raises(SpecError) as info:
            build(spec)
        assert str(info.value) == (
            "<spec>: stages[0]: a Run stage needs a command or steps\n<spec>: stages[1].depends_on: unknown stage 'c'"
        )
        with pytest.raises(TypeError, match=r"^build\(\) takes a pipekit\.spec\.PipelineSpec, got dict$"):
            build({"name": "x"})  # type: ignore[arg-type]


class TestSpecError:
    def test_attributes_and_text(self) -> None:
        """A SpecError carries source, path, line and message; str() is one line; it is a ValueError."""
        with pytest.raises(SpecError) as info:
            loads("name: x\nstages:\n  - name: a\n    command: ls\n    timeout: ten\n", source="ci.yaml")
        err = info.value
        assert (err.source, err.path, err.line, err.message) == (
            "ci.yaml",
            "stages[0].timeout",
            5,
            'expected a number of seconds, got "ten"',
        )
        assert str(err) == 'ci.yaml:5: stages[0].timeout: expected a number of seconds, got "ten"'
        assert err.errors == (err,)
        assert isinstance(err, ValueError)
        assert isinstance(err, pk.PipekitError)

    def test_aggregate(self) -> None:
        """Several problems are reported at once, one line each, in file order; the first is the error's own."""
        message = error_of(
            """\
            name: x
            stages:
              - name: a
                comand: ls
              - name: a
                command: ls
                timeout: ten
            """
        )
        assert message == (
            "pipeline.yaml:4: stages[0].comand: unknown field (did you mean 'command'?)\n"
            'pipeline.yaml:7: stages[1].timeout: expected a number of seconds, got "ten"'
        )
        with pytest.raises(SpecError) as info:
            loads("name: x\nstages:\n  - name: a\n  - name: a\n    command: ls\n")
        err = info.value
        assert [(e.path, e.line) for e in err.errors] == [("stages[0]", 3), ("stages[1].name", 4)]
        assert (err.path, err.line) == ("stages[0]", 3)
        assert all("\n" not in str(e) for e in err.errors)

    def test_pickle(self) -> None:
        """A SpecError survives pickling (to another process), aggregate included."""
        with pytest.raises(SpecError) as info:
            loads("name: x\nstages:\n  - name: a\n  - name: a\n    command: ls\n", source="p.yaml")
        copy = pickle.loads(pickle.dumps(info.value))
        assert str(copy) == str(info.value)
        assert [(e.path, e.line) for e in copy.errors] == [("stages[0]", 3), ("stages[1].name", 4)]


class TestBadInput:
    """Each bad input gets a one-line error naming the problem, its field path and its line."""

    def test_malformed_yaml(self) -> None:
        """The YAML parser's problem and line."""
        assert error_of("name: demo\nstages:\n  - name: a\n    command: [echo\n") == (
            "pipeline.yaml:5: malformed YAML: while parsing a flow sequence (line 4), "
            "expected ',' or ']', but got '<stream end>'"
        )
        assert error_of("name: demo\nstages:\n\t- name: a\n") == (
            "pipeline.yaml:3: malformed YAML: while scanning for the next token, "
            "found character '\\t' that cannot start any token"
        )
        assert error_of("name: a\n---\nname: b\n") == (
            "pipeline.yaml:2: malformed YAML: expected a single document in the stream (line 1), "
            "but found another document"
        )
        assert error_of("name: !foo x\n") == (
            "pipeline.yaml:1: malformed YAML: could not determine a constructor for the tag '!foo'"
        )
        assert error_of("name: !!int abc\n") == (
            "pipeline.yaml: malformed YAML: invalid literal for int() with base 10: 'abc'"
        )

    def test_malformed_json(self) -> None:
        """The JSON decoder's problem, line and column."""
        text = '{"name": "demo",\n "stages": [\n  {"name": "a" "command": "x"}]}'
        assert error_of(text, format="json") == "pipeline.json:3: malformed JSON: Expecting ',' delimiter (column 16)"
        assert (
            error_of('{"name": NaN}', format="json") == "pipeline.json: malformed JSON: NaN is not a number JSON allows"
        )
        assert error_of("", format="json") == "pipeline.json:1: malformed JSON: Expecting value (column 1)"

    def test_json_errors_have_lines(self) -> None:
        """Errors in a JSON file point at their line too (tabs and all)."""
        text = '{\n\t"name": "x",\n\t"stages": [{"name": "a", "command": "ls"},\n\t\t{"name": "b", "timeout": "ten"}]}'
        assert (
            error_of(text, format="json")
            == 'pipeline.json:4: stages[1].timeout: expected a number of seconds, got "ten"'
        )
        assert error_of('{"name": "x",\n "name": "y"}', format="json") == (
            "pipeline.json:2: name: duplicate key 'name' (also at line 1)"
        )

    def test_not_a_pipeline(self) -> None:
        """An empty file, or one that is not a mapping."""
        assert error_of("") == "pipeline.yaml:1: the file is empty (expected a mapping with name and stages)"
        assert (
            error_of("# only a comment\n")
            == "pipeline.yaml:1: the file is empty (expected a mapping with name and stages)"
        )
        assert (
            error_of("- name: a\n")
            == "pipeline.yaml:1: expected a mapping with name and stages at the top level, got a list"
        )
        assert error_of("just text\n") == (
            'pipeline.yaml:1: expected a mapping with name and stages at the top level, got "just text"'
        )

    def test_unknown_fields(self) -> None:
        """Unknown fields, at any depth, with a suggestion when one is close."""
        assert error_of("name: x\nstages:\n  - name: a\n    comand: ls\n") == (
            "pipeline.yaml:4: stages[0].comand: unknown field (did you mean 'command'?)"
        )
        assert error_of("name: x\nstags: []\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: stags: unknown field (did you mean 'stages'?)"
        )
        assert (
            error_of("name: x\nowner: me\nstages: [{name: a, command: ls}]\n")
            == "pipeline.yaml:2: owner: unknown field"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    retry:\n      attempts: 3\n") == (
            "pipeline.yaml:6: stages[0].retry.attempts: unknown field (did you mean 'max_attempts'?)"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    steps:\n      - {comand: ls}\n") == (
            "pipeline.yaml:5: stages[0].steps[0].comand: unknown field (did you mean 'command'?)"
        )
        assert error_of(
            "name: x\nstages:\n  - name: a\n    command: ls\n    env:\n      T: {secret: true, valu: x}\n"
        ) == ("pipeline.yaml:6: stages[0].env.T.valu: unknown field (did you mean 'value'?)")

    def test_wrong_types(self) -> None:
        """A value of the wrong type, with what was expected and what was given."""
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n  - name: b\n    command: ls\n  - name: c\n"
                        "    command: ls\n    timeout: ten\n") == (
            'pipeline.yaml:9: stages[2].timeout: expected a number of seconds, got "ten"'
        )  # fmt: skip
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, timeout: -3}\n") == (
            "pipeline.yaml:3: stages[0].timeout: expected a number of seconds > 0, got -3"
        )
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, timeout: true}\n") == (
            "pipeline.yaml:3: stages[0].timeout: expected a number of seconds, got true"
        )
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, retry: {delay: -1}}\n") == (
            "pipeline.yaml:3: stages[0].retry.delay: expected a number of seconds >= 0, got -1"
        )
        assert error_of("name: x\nparallel: yes please\nstages: [{name: a, command: ls}]\n") == (
            'pipeline.yaml:2: parallel: expected true or false, got "yes please"'
        )
        assert (
            error_of("name: 5\nstages: [{name: a, command: ls}]\n") == "pipeline.yaml:1: name: expected a string, got 5"
        )
        assert error_of("name: x\nstages: [{name: a, command: [ls, 1]}]\n") == (
            "pipeline.yaml:2: stages[0].command[1]: expected a string, got 1"
        )
        assert error_of("name: x\nstages: [{name: a, command: {run: ls}}]\n") == (
            "pipeline.yaml:2: stages[0].command: expected a string or a list, got a mapping"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    retry: {max_attempts: 0}\n") == (
            "pipeline.yaml:5: stages[0].retry.max_attempts: expected an integer >= 1, got 0"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    type: Biuld\n") == (
            'pipeline.yaml:4: stages[0].type: expected one of "Run", "Build", "Deploy", got "Biuld" '
            '(did you mean "Build"?)'
        )
        assert error_of("name: x\nstages:\n  - name: a\n    type: deploy\n") == (
            'pipeline.yaml:4: stages[0].type: expected one of "Run", "Build", "Deploy", got "deploy" '
            '(did you mean "Deploy"?)'
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    env:\n      A: ok\n      B: [1]\n") == (
            "pipeline.yaml:7: stages[0].env.B: expected a string, a number, a boolean or a mapping, got a list"
        )
        assert error_of("name: x\nvariables: {A: null}\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: variables.A: expected a string, a number or a boolean, got null"
        )
        assert (
            error_of("name: x\nstages: []\n") == "pipeline.yaml:2: stages: expected a non-empty list, got an empty list"
        )
        assert error_of("name: ''\nstages: [{name: a, command: ls}]\n") == (
            'pipeline.yaml:1: name: expected a non-empty string, got ""'
        )

    def test_every_wrong_value_is_reported(self) -> None:
        """Not only the first value of a wrong type: every one, with unknown fields and missing ones, in file order."""
        text = """\
            name: x
            parallel: maybe
            stages:
              - name: a
                command: ls
                timeout: ten
                retry: {max_attempts: 0, delay: soon}
              - name: b
                comand: ls
                env: {X: {value: 1, secret: "yes"}}
              - command: ls
                depends_on: [1]
            """
        assert error_of(text).splitlines() == [
            'pipeline.yaml:2: parallel: expected true or false, got "maybe"',
            'pipeline.yaml:6: stages[0].timeout: expected a number of seconds, got "ten"',
            "pipeline.yaml:7: stages[0].retry.max_attempts: expected an integer >= 1, got 0",
            'pipeline.yaml:7: stages[0].retry.delay: expected a number of seconds, got "soon"',
            "pipeline.yaml:9: stages[1].comand: unknown field (did you mean 'command'?)",
            'pipeline.yaml:10: stages[1].env.X.secret: expected true or false, got "yes"',
            "pipeline.yaml:11: stages[2]: missing required field 'name'",
            "pipeline.yaml:12: stages[2].depends_on[0]: expected a string, got 1",
        ]

    def test_keys_that_are_not_strings(self) -> None:
        """A mapping key YAML reads as a number names the mapping and how to quote it."""
        assert error_of("name: x\nvariables: {1: a}\nstages: [{name: a, command: ls}]\n") == (
            'pipeline.yaml:2: variables: keys must be strings, got 1 (quote it: "1")'
        )
        assert error_of("name: x\nstages: [{name: a, command: ls, env: {2: b}}]\n") == (
            'pipeline.yaml:2: stages[0].env: keys must be strings, got 2 (quote it: "2")'
        )

    def test_missing_fields(self) -> None:
        """A required field that is missing, at the mapping that lacks it."""
        assert error_of("stages: [{name: a, command: ls}]\n") == "pipeline.yaml:1: missing required field 'name'"
        assert (
            error_of("name: x\nstages:\n  - command: ls\n")
            == "pipeline.yaml:3: stages[0]: missing required field 'name'"
        )
        assert error_of("name: x\nvalidators: {tools: [{min_version: '1'}]}\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: validators.tools[0]: missing required field 'name'"
        )

    def test_duplicate_stage_names(self) -> None:
        """Stage names are unique."""
        assert error_of("name: x\nstages:\n  - {name: build, command: ls}\n  - {name: test, command: ls}\n"
                        "  - {name: build, command: ls}\n") == (
            "pipeline.yaml:5: stages[2].name: duplicate stage name 'build' (also stages[0])"
        )  # fmt: skip
        assert error_of("name: x\ngit_repository: u\nstages: [{name: checkout, command: ls}]\n") == (
            "pipeline.yaml:3: stages[0].name: the stage name 'checkout' is taken by the clone of git_repository"
        )

    def test_duplicate_keys(self) -> None:
        """A key given twice in one mapping (YAML would silently keep the last)."""
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    command: pwd\n") == (
            "pipeline.yaml:5: stages[0].command: duplicate key 'command' (also at line 4)"
        )

    def test_dependency_cycles(self) -> None:
        """A cycle is reported at the depends_on that closes it, with the whole cycle."""
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, depends_on: [c]}\n  - {name: b, command: ls}\n"
                        "  - {name: c, command: ls}\n") == (
            "pipeline.yaml:3: stages[0].depends_on: dependency cycle: a -> c -> b -> a"
        )  # fmt: skip
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, depends_on: [b]}\n"
                        "  - {name: b, command: ls, depends_on: [a]}\n") == (
            "pipeline.yaml:3: stages[0].depends_on: dependency cycle: a -> b -> a"
        )  # fmt: skip
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, depends_on: a}\n") == (
            "pipeline.yaml:3: stages[0].depends_on: stage 'a' depends on itself"
        )

    def test_unknown_dependencies(self) -> None:
        """depends_on names a stage that does not exist."""
        assert error_of("name: x\nstages:\n  - {name: build, command: ls}\n  - name: test\n    command: ls\n"
                        "    depends_on: [biuld]\n") == (
            "pipeline.yaml:6: stages[1].depends_on[0]: unknown stage 'biuld' (did you mean 'build'?)"
        )  # fmt: skip
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, depends_on: zzz}\n") == (
            "pipeline.yaml:3: stages[0].depends_on: unknown stage 'zzz'"
        )

    def test_unknown_references(self) -> None:
        """``${NAME}`` must be a declared variable or input, wherever it is."""
        assert error_of("name: x\nvariables: {VERSION: 1}\nstages:\n  - name: a\n    command: echo ${VERSON}\n") == (
            "pipeline.yaml:5: stages[0].command: unknown variable ${VERSON} (did you mean ${VERSION}?)"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: echo ${HOME}\n") == (
            "pipeline.yaml:4: stages[0].command: unknown variable ${HOME}; "
            "declare it under variables or inputs, or write $${HOME} for a literal"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: [echo, '${}']\n") == (
            "pipeline.yaml:4: stages[0].command[1]: ${} is not a valid reference"
        )
        for field in ("cwd: '${X}'", "env: {A: '${X}'}", "rollback: 'echo ${X}'", "steps: ['echo ${X}']"):
            command = "" if field.startswith("steps") else "command: ls, "
            message = error_of(f"name: x\nstages: [{{name: a, {command}{field}}}]\n")
            assert message.startswith("pipeline.yaml:2: stages[0]."), message
            assert "unknown variable ${X}" in message, message
        assert error_of("name: x\nstages: [{name: a, type: Build, tag: 'app:${TAG}'}]\n") == (
            "pipeline.yaml:2: stages[0].tag: unknown variable ${TAG}; "
            "declare it under variables or inputs, or write $${TAG} for a literal"
        )
        assert error_of("name: x\nworkspace: /tmp/${X}\ngit_repository: u\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: workspace: the workspace cannot use ${NAME} references"
        )
        # Declared names, literal $$ and plain $ are fine.
        parse("name: x\nvariables: {A: 1}\ninputs: [b]\nstages: [{name: a, command: 'echo ${A} ${b} $${HOME} $HOME'}]")

    def test_bad_conditions(self) -> None:
        """A condition outside the language, or reading something undeclared, at its line."""
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    when: __import__('os')\n") == (
            "pipeline.yaml:5: stages[0].when: function calls are not allowed in a condition"
        )
        assert error_of(
            "name: x\nvariables: {ENV: p}\nstages:\n  - {name: a, command: ls, when: variables.ENB == 1}\n"
        ) == ("pipeline.yaml:4: stages[0].when: unknown variable 'ENB' (did you mean variables.ENV?)")
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, when: input.force}\n") == (
            "pipeline.yaml:3: stages[0].when: unknown input 'force'; declare it under inputs"
        )
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, when: outputs.biuld.returncode == 0}\n") == (
            "pipeline.yaml:3: stages[0].when: unknown stage 'biuld' in outputs"
        )
        assert error_of("name: x\nstages:\n  - {name: a, command: ls, when: 'variables.x =='}\n").startswith(
            "pipeline.yaml:3: stages[0].when: invalid syntax"
        )

    def test_stage_kinds(self) -> None:
        """Each stage type needs its fields and refuses the others'."""
        cases = {
            "{name: a}": "pipeline.yaml:2: stages[0]: a Run stage needs a command or steps",
            "{name: a, command: ls, steps: [ls]}": (
                "pipeline.yaml:2: stages[0].steps: give either command or steps, not both"
            ),
            "{name: a, type: Build}": "pipeline.yaml:2: stages[0]: a Build stage needs a tag (or a command)",
            "{name: a, type: Deploy}": "pipeline.yaml:2: stages[0]: a Deploy stage needs a manifest (or a command)",
            "{name: a, type: Build, tag: t, command: ls}": (
                "pipeline.yaml:2: stages[0].tag: give either command or tag, not both"
            ),
            "{name: a, type: Deploy, command: ls, namespace: n}": (
                "pipeline.yaml:2: stages[0].namespace: give either command or namespace, not both"
            ),
            "{name: a, type: Deploy, command: ls, steps: [ls]}": (
                "pipeline.yaml:2: stages[0].steps: give either command or steps, not both"
            ),
            "{name: a, type: Build, tag: t, steps: [ls]}": (
                "pipeline.yaml:2: stages[0].steps: a Build stage runs one command; use a Run stage for steps"
            ),
            "{name: a, type: Deploy, manifest: m, shell: true}": (
                "pipeline.yaml:2: stages[0].shell: shell needs a command (Deploy runs kubectl apply as arguments)"
            ),
            "{name: a, type: Build, tag: --help}": (
                "pipeline.yaml:2: stages[0].tag: '--help' would be read as an option"
            ),
            "{name: a, command: ls, tag: t}": "pipeline.yaml:2: stages[0].tag: only Build stages take tag",
            "{name: a, type: Build, tag: t, namespace: n}": (
                "pipeline.yaml:2: stages[0].namespace: only Deploy stages take namespace"
            ),
            "{name: a, steps: [{name: s}]}": (
                "pipeline.yaml:2: stages[0].steps[0]: a step needs either command or script"
            ),
            "{name: a, steps: [{command: ls, script: ls}]}": (
                "pipeline.yaml:2: stages[0].steps[0]: a step needs either command or script"
            ),
            "{name: a, command: 'echo \"open'}": (
                "pipeline.yaml:2: stages[0].command: cannot split the command like a shell would: No closing quotation"
            ),
            "{name: a, command: '  '}": "pipeline.yaml:2: stages[0].command: the command is empty",
        }
        for stage, message in cases.items():
            assert error_of(f"name: x\nstages: [{stage}]\n") == message

    def test_env_values(self) -> None:
        """An env mapping gives value or from_env; names are variable names."""
        assert error_of(
            "name: x\nstages:\n  - name: a\n    command: ls\n    env:\n      A: {value: x, from_env: B}\n"
        ) == ("pipeline.yaml:6: stages[0].env.A: give either value or from_env")
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    env:\n      A: {secret: true}\n") == (
            "pipeline.yaml:6: stages[0].env.A: give either value or from_env"
        )
        assert error_of("name: x\nstages:\n  - name: a\n    command: ls\n    env:\n      A=B: x\n") == (
            "pipeline.yaml:6: stages[0].env[\"A=B\"]: 'A=B' is not an environment variable name"
        )

    def test_top_level_fields(self) -> None:
        """Variables, inputs, validators, timeouts and the repository are checked."""
        assert error_of("name: x\nvariables: {my-var: 1}\nstages: [{name: a, command: ls}]\n") == (
            'pipeline.yaml:2: variables["my-var"]: variable names must be identifiers (letters, digits and _)'
        )
        assert error_of("name: x\ninputs: [ok, not ok]\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: inputs[1]: input names must be identifiers (letters, digits and _), got 'not ok'"
        )
        assert error_of("name: x\ntimeout: 0s\nstages: [{name: a, command: ls}]\n") == (
            'pipeline.yaml:2: timeout: expected a number of seconds > 0, got "0s"'
        )
        assert error_of(
            "name: x\nvalidators:\n  tools:\n    - {name: go, min_version: latest}\nstages: [{name: a, command: ls}]\n"
        ) == ("pipeline.yaml:4: validators.tools[0].min_version: min_version 'latest' is not a version like '1.21'")
        assert error_of("name: x\nvalidators: {env: [A=B]}\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: validators.env[0]: 'A=B' is not an environment variable name"
        )
        assert error_of("name: x\ngit_repository: --upload-pack=evil\nstages: [{name: a, command: ls}]\n") == (
            "pipeline.yaml:2: git_repository: expected a repository URL, got '--upload-pack=evil'"
        )

    def test_oversized_files(self) -> None:
        """Alias bombs, self-referencing aliases and deep nesting are refused with a message."""
        bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        for i in range(6):
            bomb += f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
        assert (
            error_of(bomb) == "pipeline.yaml:1: the file holds more than 100000 values (anchors and aliases expanded)"
        )
        assert (
            error_of("name: x\nstages: &s [*s]\n")
            == "pipeline.yaml:2: the file is nested too deeply (more than 64 levels)"
        )
        assert error_of("name: x\nstages: " + "[" * 100 + "]" * 100 + "\n") == (
            "pipeline.yaml:2: the file is nested too deeply (more than 64 levels)"
        )
        assert (
            error_of("x: " + "[" * 5000 + "]" * 5000)
            == "pipeline.yaml: the file is nested too deeply (more than 64 levels)"
        )
        assert error_of('{"x": ' + "[" * 100 + "]" * 100 + "}", format="json") == (
            "pipeline.json:1: the file is nested too deeply (more than 64 levels)"
        )

    def test_unknown_format(self) -> None:
        """loads() names an unknown format."""
        with pytest.raises(SpecError, match=r"^<string>: unknown format 'toml' \(expected 'yaml' or 'json'\)$"):
            loads("", format="toml")  # type: ignore[arg-type]


class TestLoad:
    def test_by_suffix(self, tmp_path: Path) -> None:
        """load() picks the format from the suffix and names the file in errors."""
        for suffix in (".yaml", ".yml", ".YAML"):
            path = tmp_path / f"pipeline{suffix}"
            path.write_text("name: x\nstages: [{name: a, command: ls}]\n", encoding="utf-8")
            assert load(path).stage_names == ("a",)
        path = tmp_path / "pipeline.json"
        path.write_text('{"name": "x", "stages": [{"name": "a", "command": "ls", "timeout": "ten"}]}', encoding="utf-8")
        with pytest.raises(SpecError) as info:
            load(path)
        assert str(info.value) == f'{path}:1: stages[0].timeout: expected a number of seconds, got "ten"'
        assert info.value.source == str(path)

    def test_utf8_with_bom(self, tmp_path: Path) -> None:
        """A UTF-8 byte order mark is fine."""
        path = tmp_path / "p.yaml"
        path.write_bytes("\ufeffname: café\nstages: [{name: a, command: ls}]\n".encode())
        assert load(path).name == "café"

    def test_bad_files(self, tmp_path: Path) -> None:
        """An unknown suffix, text that is not UTF-8, and a missing file."""
        (tmp_path / "p.toml").write_text("", encoding="utf-8")
        with pytest.raises(SpecError) as info:
            load(tmp_path / "p.toml")
        assert str(info.value) == f"{tmp_path / 'p.toml'}: unknown file type '.toml' (expected .yaml, .yml or .json)"
        (tmp_path / "p.yaml").write_bytes(b"name: \xff\n")
        with pytest.raises(SpecError) as info:
            load(tmp_path / "p.yaml")
        assert str(info.value) == f"{tmp_path / 'p.yaml'}: the file is not UTF-8 text (invalid start byte at byte 6)"
        with pytest.raises(FileNotFoundError):
            load(tmp_path / "missing.yaml")


class TestSchema:
    def test_shipped_schema_is_generated(self) -> None:
        """The shipped pipeline.schema.json is what json_schema() generates (regenerate: python -m pipekit.spec)."""
        assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text()
        assert json.loads(SCHEMA_PATH.read_text(encoding="utf-8")) == json_schema()

    def test_regeneration_command(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``python -m pipekit.spec`` writes the file and the docs' copy; ``--check`` fails when one is out of date."""
        target = tmp_path / "pipeline.schema.json"
        page = tmp_path / "spec.md"
        page.write_text(f"# Pipeline files\n\n{DOCS_START}\nstale\n{DOCS_END}\n", encoding="utf-8")
        monkeypatch.setattr("pipekit.spec.__main__.SCHEMA_PATH", target)
        monkeypatch.setattr("pipekit.spec.__main__.DOCS_PATH", page)
        assert schema_main(["--check"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            f"{target} is out of date; run: python -m pipekit.spec",
            f"{page} is out of date; run: python -m pipekit.spec",
        ]
        assert schema_main([]) == 0
        assert target.read_text(encoding="utf-8") == schema_text()
        shown = page.read_text(encoding="utf-8")
        assert "stale" not in shown
        assert textwrap.indent(schema_text(), "    ") in shown
        assert schema_main(["--check"]) == 0
        assert schema_main(["--bogus"]) == 2

    def test_the_docs_show_the_whole_schema(self) -> None:
        """docs/spec.md shows the schema as generated (regenerate: python -m pipekit.spec)."""
        page = DOCS_PATH.read_text(encoding="utf-8")
        assert page == docs_with_schema(page)
        assert textwrap.indent(schema_text(), "    ") in page
        with pytest.raises(ValueError, match="markers"):
            docs_with_schema("# no markers\n")

    def test_shape(self) -> None:
        """Draft 2020-12; every object refuses unknown fields and every field is described."""
        schema = json_schema()
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$ref"] == "#/$defs/PipelineSpec"
        definitions = schema["$defs"]
        assert set(definitions) == {
            "PipelineSpec", "StageSpec", "StepSpec", "RetrySpec", "EnvValueSpec", "ValidatorsSpec", "ToolSpec",
        }  # fmt: skip
        for name, definition in definitions.items():
            assert definition["additionalProperties"] is False, name
            assert definition["description"], name
            for field, prop in definition["properties"].items():
                assert prop.get("description"), f"{name}.{field}"
        assert definitions["PipelineSpec"]["required"] == ["name", "stages"]
        stage = definitions["StageSpec"]["properties"]
        assert stage["type"]["enum"] == ["Build", "Deploy", "Run"]
        assert "Seconds" in json.dumps(stage["timeout"])

    def test_json_schema_returns_a_new_dict(self) -> None:
        """Changing the returned schema does not change the next one."""
        schema = json_schema()
        schema["$defs"].clear()
        assert json_schema()["$defs"]


class TestDocs:
    def test_every_yaml_example_parses(self) -> None:
        """Each ```yaml / ```json block of docs/spec.md is a valid pipeline, unless it is marked ``# invalid``."""
        page = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
        blocks = re.findall(r"^```(yaml|json)\n(.*?)^```$", page, flags=re.MULTILINE | re.DOTALL)
        assert len(blocks) >= 4
        valid = [(language, block) for language, block in blocks if not block.startswith("# invalid")]
        assert len(valid) >= 3
        for language, block in valid:
            assert isinstance(parse(block, format=language), PipelineSpec)

    def test_invalid_examples_say_what_the_page_says(self) -> None:
        """Each ``# invalid`` block fails to load with exactly the messages the ```text block after it shows."""
        page = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
        invalid = re.findall(r"^```yaml\n(# invalid.*?)^```$", page, flags=re.MULTILINE | re.DOTALL)
        assert invalid
        for block in invalid:
            with pytest.raises(SpecError) as info:
                loads(block, source="pipeline.yaml")
            assert f"```text\n{info.value}\n```" in page


class TestExports:
    def test_all(self) -> None:
        """``__all__`` is a sorted tuple of names that exist and report the public module."""
        names = pipekit.spec.__all__
        assert isinstance(names, tuple)
        assert list(names) == sorted(set(names))
        for name in names:
            obj = getattr(pipekit.spec, name)
            assert getattr(obj, "__module__", "pipekit.spec") == "pipekit.spec", name

    def test_error_tree(self) -> None:
        """SpecError is a PipekitError and a ValueError."""
        assert issubclass(SpecError, pk.PipekitError)
        assert issubclass(SpecError, ValueError)

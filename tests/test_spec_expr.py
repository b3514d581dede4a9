"""The ``when`` expression language of pipeline files: what it accepts, how it evaluates, what it refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipekit.spec._expr import MAX_DEPTH, MAX_LENGTH, Condition, ExpressionError, Reference, compile_condition


@attrs.frozen
class Result:
    returncode: int
    stdout: str

    @property
    def broken(self) -> str:
        raise RuntimeError("a property that raises")


VARIABLES = {"env": "prod", "replicas": 3, "deploy": True, "empty": "", "ratio": 0.5}
INPUT = {"branch": "main", "tags": ["a", "b"]}
OUTPUTS: dict[str, Any] = {
    "build": Result(returncode=0, stdout="ok\n"),
    "unit-tests": [Result(returncode=0, stdout=""), Result(returncode=2, stdout="")],
    "config": {"region": "eu", "zones": [1, 2]},
}


def evaluate(
    source: str,
    *,
    variables: Mapping[str, Any] = VARIABLES,
    input: Mapping[str, Any] = INPUT,  # noqa: A002 - the language's name
    outputs: Mapping[str, Any] = OUTPUTS,
) -> bool:
    """Compile ``source`` and evaluate it against the test data."""
    return compile_condition(source).evaluate(variables=variables, input=input, outputs=outputs)


def refusal(source: str) -> str:
    """The message ``source`` is refused with."""
    with pytest.raises(ExpressionError) as info:
        compile_condition(source)
    return str(info.value)


class TestEvaluation:
    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ('variables.env == "prod"', True),
            ('variables.env != "prod"', False),
            ("variables.replicas > 2", True),
            ("variables.replicas >= 4", False),
            ("1 < variables.replicas <= 3", True),
            ("0 < variables.ratio < 0.4", False),
            ("variables.deploy", True),
            ("variables.empty", False),
            ("not variables.empty", True),
            ("variables.deploy == true and variables.env in ['prod', 'staging']", True),
            ('variables.env not in ("dev", "test")', True),
            ("variables.replicas in [1, 2]", False),
            ('input.branch == "main" or false', True),
            ('"a" in input.tags', True),
            ('"z" not in input.tags', True),
            ('"ma" in input.branch', True),
            ("outputs.build.returncode == 0", True),
            ('outputs["build"].stdout == "ok\\n"', True),
            ('outputs["unit-tests"][1].returncode == 2', True),
            ('outputs["unit-tests"][-1].returncode == 2', True),
            ('outputs.config.region == "eu"', True),
            ("outputs.config.zones[0] == 1", True),
            ("variables.replicas == -3", False),
            ("null == None", True),
            ("True and not False", True),
            ("(variables.deploy or false) and (not variables.empty)", True),
        ],
    )
    def test_values(self, source: str, expected: bool) -> None:
        """Comparisons, boolean logic, membership and lookups evaluate as in Python."""
        assert evaluate(source) is expected

    @pytest.mark.parametrize(
        "source",
        [
            "variables.missing",
            "variables.missing.deeper[0]",
            'input.nothing == "x"',
            "outputs.skipped.returncode == 0",
            'outputs["unit-tests"][7].returncode == 0',
            "outputs.build.nothing",
            "outputs.build.broken",
            "outputs.build.stdout.upper",
            "outputs.config.zones.count",
            'variables.env.startswith == "x"',
        ],
    )
    def test_missing_is_null_and_false(self, source: str) -> None:
        """A missing variable, input, output, key, index or attribute is null: never a KeyError."""
        assert evaluate(source) is False

    def test_null_equality_for_missing_values(self) -> None:
        """A missing value equals null, so a condition can test for absence."""
        assert evaluate("variables.missing == null") is True
        assert evaluate("outputs.skipped == null and not outputs.skipped") is True

    @pytest.mark.parametrize(
        "source",
        [
            'variables.replicas < "3"',
            "variables.missing > 1",
            "1 in variables.replicas",
            "1 not in variables.missing",
            '"x" in outputs.build',
        ],
    )
    def test_impossible_comparisons_are_false(self, source: str) -> None:
        """A comparison Python cannot make (mixed types, membership in a non-container) is false."""
        assert evaluate(source) is False

    def test_called_with_a_context(self) -> None:
        """Calling a condition reads the context's variables, input and outputs."""

        class Ctx:
            variables: Mapping[str, Any] = {"env": "prod"}
            input: Mapping[str, Any] = {"force": True}
            outputs: Mapping[str, Any] = {}

        condition = compile_condition('variables.env == "prod" and input.force')
        assert condition(Ctx()) is True  # type: ignore[arg-type]

    def test_references(self) -> None:
        """A condition lists the variables, input values and outputs it reads."""
        condition = compile_condition('variables.env == "prod" and outputs["unit-tests"][0].returncode == input.code')
        assert condition.references == (
            Reference(root="variables", key="env"),
            Reference(root="outputs", key="unit-tests"),
            Reference(root="input", key="code"),
        )

    def test_repr_and_source(self) -> None:
        """The condition keeps its source, stripped, and shows it."""
        condition = compile_condition("  variables.deploy \n")
        assert isinstance(condition, Condition)
        assert condition.source == "variables.deploy"
        assert repr(condition) == "<Condition 'variables.deploy'>"


class TestRefusals:
    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("__import__('os')", "function calls are not allowed in a condition"),
            ("__import__('os').system('true')", "function calls are not allowed in a condition"),
            ("().__class__", "names starting with '_' are not allowed in a condition ('__class__')"),
            ("().__class__.__bases__[0].__subclasses__()", "function calls are not allowed in a condition"),
            ("variables.__class__", "names starting with '_' are not allowed in a condition ('__class__')"),
            ("variables._private", "names starting with '_' are not allowed in a condition ('_private')"),
            ('variables["__class__"]', "names starting with '__' are not allowed in a condition ('__class__')"),
            ('"abc".upper', "only variables, input and outputs can be looked into (like variables.NAME)"),
            ("(1).real", "only variables, input and outputs can be looked into (like variables.NAME)"),
            ("true.real", "only variables, input and outputs can be looked into (like variables.NAME)"),
            ("os", "unknown name 'os' (a condition reads variables.NAME, input.NAME or outputs.STAGE)"),
            ("eval", "unknown name 'eval' (a condition reads variables.NAME, input.NAME or outputs.STAGE)"),
            ("variables.replicas + 1 > 2", "arithmetic is not allowed in a condition"),
            ("'a' * 10", "arithmetic is not allowed in a condition"),
            ("-variables.replicas", "arithmetic is not allowed in a condition"),
            ("~1", "arithmetic is not allowed in a condition"),
            ("lambda: 1", "lambdas are not allowed in a condition"),
            ("[x for x in input.tags]", "comprehensions are not allowed in a condition"),
            ("(x := 1)", "assignments are not allowed in a condition"),
            ("1 if variables.deploy else 0", "if-else expressions are not allowed in a condition"),
            ("{'a': 1}", "dict literals are not allowed in a condition"),
            ("{1, 2}", "set literals are not allowed in a condition"),
            ("f'{variables.env}'", "f-strings are not allowed in a condition"),
            ("variables.env is None", "the 'is' operator is not allowed in a condition"),
            ("variables.env is not None", "the 'is not' operator is not allowed in a condition"),
            ("b'bytes'", "the constant b'bytes' is not allowed in a condition"),
            ("...", "the constant Ellipsis is not allowed in a condition"),
            ("1j", "the constant 1j is not allowed in a condition"),
            ("input.tags[0:1]", "slices are not allowed in a condition"),
            ("input[variables.key]", 'subscripts must be a constant string or integer, like outputs["build"]'),
            ("input[True]", 'subscripts must be a constant string or integer, like outputs["build"]'),
            ("[*input.tags]", "star expressions are not allowed in a condition"),
            ("await input", "await is not allowed in a condition"),
            ("", "the condition is empty"),
            ("   ", "the condition is empty"),
        ],
    )
    def test_refused(self, source: str, message: str) -> None:
        """Everything outside the language is refused at compile time, naming the construct."""
        assert refusal(source) == message

    @pytest.mark.parametrize("source", ["variables.x ==", "import os", "x = 1", "variables.x == 'open", "a b"])
    def test_syntax_errors(self, source: str) -> None:
        """Text that is not an expression is refused as invalid syntax (the parser's details vary by Python)."""
        assert refusal(source).startswith("invalid syntax")

    def test_not_a_string(self) -> None:
        """A condition must be text."""
        assert refusal(True) == "a condition must be a string, got bool"  # type: ignore[arg-type]

    def test_huge_string(self) -> None:
        """A condition longer than the limit is refused before it is parsed."""
        huge = "variables.env == '" + "x" * 100_000 + "'"
        assert refusal(huge) == f"the condition is too long ({len(huge)} characters; at most {MAX_LENGTH})"

    def test_deep_nesting(self) -> None:
        """Deep nesting is refused, whether the parser or the checker notices it."""
        assert refusal("not " * (MAX_DEPTH + 1) + "true") == (
            f"the condition is nested too deeply (more than {MAX_DEPTH} levels)"
        )
        assert refusal("variables" + ".a" * MAX_DEPTH) == (
            f"the condition is nested too deeply (more than {MAX_DEPTH} levels)"
        )
        assert refusal("(" * 300 + "1" + ")" * 300).startswith("invalid syntax")
        assert refusal("[" * 400 + "]" * 400).startswith("invalid syntax")

    def test_null_byte(self) -> None:
        """Text the parser cannot take is refused with a message, not a raw ValueError."""
        assert "null bytes" in refusal("variables.x\x00")

    def test_nested_within_limits(self) -> None:
        """Nesting up to the limit is accepted."""
        assert evaluate("not " * (MAX_DEPTH - 2) + "true") is True


class TestProperties:
    @given(st.text(max_size=200))
    def test_arbitrary_text_is_accepted_or_refused_cleanly(self, text: str) -> None:
        """Any text either compiles into a condition that evaluates to a bool, or raises ExpressionError."""
        try:
            condition = compile_condition(text)
        except ExpressionError:
            return
        result = condition.evaluate(variables=VARIABLES, input=INPUT, outputs=OUTPUTS)
        assert isinstance(result, bool)

    @given(
        st.recursive(
            st.one_of(
                st.sampled_from(["variables.env", "input.branch", "outputs.build.returncode", "null", "true"]),
                st.integers(-5, 5).map(str),
                st.text("abc", max_size=3).map(repr),
            ),
            lambda inner: st.one_of(
                st.tuples(inner, st.sampled_from(["==", "!=", "<", ">=", "in", "not in"]), inner).map(
                    lambda t: f"({t[0]}) {t[1]} ({t[2]})"
                ),
                st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({' '.join(t)})"),
                inner.map(lambda e: f"not ({e})"),
            ),
            max_leaves=8,
        )
    )
    def test_valid_expressions_never_raise(self, source: str) -> None:
        """Expressions of the language always evaluate to a bool, whatever the data."""
        for variables in (VARIABLES, {}, {"env": None}):
            result = compile_condition(source).evaluate(variables=variables, input=INPUT, outputs=OUTPUTS)
            assert isinstance(result, bool)

"""The ``when`` expression language: a small, safe subset of Python expressions.

A condition is parsed with `ast.parse` and every node is checked against a
short allow-list; nothing is ever passed to `eval`. What is allowed:

- ``and``, ``or``, ``not`` and parentheses;
- comparisons ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``
  (chained too: ``1 < x <= 3``);
- constants: strings, integers, floats (a leading ``-`` included), ``true``,
  ``false``, ``null`` (and Python's ``True``, ``False``, ``None``);
- the names ``variables``, ``input`` and ``outputs``, with attribute access
  (``variables.env``) and constant subscripts (``outputs["unit-tests"]``,
  ``outputs.test[0]``) on them and on what they hold;
- list and tuple literals (for ``in``).

Evaluation never raises: a missing variable, input value, output, key,
index or attribute is ``null``, and looking into ``null`` gives ``null``; a
comparison Python cannot make (``"a" < 1``, ``x in null``) is false. The
result is the truth value of the whole expression.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

if TYPE_CHECKING:
    from pipekit._context import StageContext

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "Condition", "ExpressionError", "compile_condition"]

#: The longest condition accepted, in characters.
MAX_LENGTH: Final = 1000
#: The deepest nesting of a condition's syntax tree.
MAX_DEPTH: Final = 32

#: The names a condition can read, and what each stands for.
ROOTS: Final = ("variables", "input", "outputs")
_LITERALS: Final[Mapping[str, object]] = {"true": True, "false": False, "null": None}

_COMPARISONS: Final[Mapping[type[ast.cmpop], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}

# What the constructs a condition cannot use are called in error messages.
_FORBIDDEN: Final[Mapping[type[ast.AST], str]] = {
    ast.Call: "function calls are",
    ast.Lambda: "lambdas are",
    ast.BinOp: "arithmetic is",
    ast.IfExp: "if-else expressions are",
    ast.Dict: "dict literals are",
    ast.Set: "set literals are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are",
    ast.NamedExpr: "assignments are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
    ast.JoinedStr: "f-strings are",
    ast.Starred: "star expressions are",
}


class ExpressionError(ValueError):
    """A condition is not valid: the message says what is wrong with it."""


@attrs.frozen(kw_only=True)
class Reference:
    """A value a condition reads: ``variables.env`` is ``Reference(root="variables", key="env")``.

    Attributes:
        root: ``"variables"``, ``"input"`` or ``"outputs"``.
        key: The key looked up in it.
    """

    root: str
    key: str | int


@attrs.frozen(kw_only=True, repr=False)
class Condition:
    """A compiled condition: call it with a stage context to evaluate it.

    Attributes:
        source: The expression as written.
        references: The variables, input values and outputs it reads.
    """

    source: str
    references: tuple[Reference, ...]
    _tree: ast.expr = attrs.field(alias="tree", eq=False)

    def __call__(self, ctx: StageContext) -> bool:
        """Evaluate the condition against ``ctx.variables``, ``ctx.input`` and ``ctx.outputs``."""
        roots = {"variables": ctx.variables, "input": ctx.input, "outputs": ctx.outputs}
        return _truth(_evaluate(self._tree, roots))

    def evaluate(self, *, variables: Mapping[str, Any], input: Mapping[str, Any], outputs: Mapping[str, Any]) -> bool:  # noqa: A002 - the language's name
        """Evaluate the condition against these mappings (what calling it does with a context's)."""
        return _truth(_evaluate(self._tree, {"variables": variables, "input": input, "outputs": outputs}))

    def __repr__(self) -> str:
        return f"<Condition {self.source!r}>"


def compile_condition(source: str) -> Condition:
    """Check ``source`` against the language and compile it.

    Args:
        source: The expression.

    Returns:
        The condition.

    Raises:
        ExpressionError: Naming the first thing the language does not allow.
    """
    if not isinstance(source, str):
        raise ExpressionError(f"a condition must be a string, got {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ExpressionError("the condition is empty")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the condition is too long ({len(text)} characters; at most {MAX_LENGTH})")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        detail = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise ExpressionError(f"invalid syntax{where}{detail}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError("the condition cannot be parsed (null bytes or too deeply nested)") from None
    references: list[Reference] = []
    _check(tree.body, 1, references)
    return Condition(source=text, references=tuple(references), tree=tree.body)


def _check(node: ast.AST, depth: int, references: list[Reference]) -> None:
    """Raise `ExpressionError` unless every node under ``node`` is allowed; collect the references."""
    if depth > MAX_DEPTH:
        raise ExpressionError(f"the condition is nested too deeply (more than {MAX_DEPTH} levels)")
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, depth + 1, references)
    elif isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            _check(node.operand, depth + 1, references)
        elif isinstance(node.op, ast.USub | ast.UAdd) and _is_number(node.operand):
            pass
        else:
            raise ExpressionError("arithmetic is not allowed in a condition")
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARISONS:
                raise ExpressionError(f"the {_op_name(op)!r} operator is not allowed in a condition")
        for operand in (node.left, *node.comparators):
            _check(operand, depth + 1, references)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, str | int | float | None):
            raise ExpressionError(f"the constant {node.value!r} is not allowed in a condition")
    elif isinstance(node, ast.Name):
        if node.id not in ROOTS and node.id not in _LITERALS:
            raise ExpressionError(
                f"unknown name {node.id!r} (a condition reads variables.NAME, input.NAME or outputs.STAGE)"
            )
    elif isinstance(node, ast.Attribute | ast.Subscript):
        _check_lookup(node, depth, references)
    elif isinstance(node, ast.List | ast.Tuple):
        for element in node.elts:
            _check(element, depth + 1, references)
    else:
        what = _FORBIDDEN.get(type(node), f"{type(node).__name__} expressions are")
        raise ExpressionError(f"{what} not allowed in a condition")


def _check_lookup(node: ast.Attribute | ast.Subscript, depth: int, references: list[Reference]) -> None:
    """Check a chain like ``outputs["build"].stdout``: public names and constant keys on a root."""
    chain: list[str | int] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute | ast.Subscript):
        depth += 1
        if depth > MAX_DEPTH:
            raise ExpressionError(f"the condition is nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(current, ast.Attribute):
            if current.attr.startswith("_"):
                raise ExpressionError(f"names starting with '_' are not allowed in a condition ({current.attr!r})")
            chain.append(current.attr)
        else:
            key = current.slice
            if isinstance(key, ast.Slice):
                raise ExpressionError("slices are not allowed in a condition")
            if isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub) and _is_number(key.operand):
                key = ast.Constant(-key.operand.value)  # type: ignore[attr-defined]
            if not (
                isinstance(key, ast.Constant) and isinstance(key.value, str | int) and not isinstance(key.value, bool)
            ):
                raise ExpressionError('subscripts must be a constant string or integer, like outputs["build"]')
            if isinstance(key.value, str) and key.value.startswith("__"):
                raise ExpressionError(f"names starting with '__' are not allowed in a condition ({key.value!r})")
            chain.append(key.value)
        current = current.value
    if not (isinstance(current, ast.Name) and current.id in ROOTS):
        raise ExpressionError("only variables, input and outputs can be looked into (like variables.NAME)")
    references.append(Reference(root=current.id, key=chain[-1]))


def _is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool)


def _op_name(op: ast.cmpop) -> str:
    return {ast.Is: "is", ast.IsNot: "is not"}.get(type(op), type(op).__name__)


# -- evaluation -------------------------------------------------------------------


def _evaluate(node: ast.expr, roots: Mapping[str, Any]) -> Any:
    """The value of a checked node (see `_check`); never raises for missing data."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return roots[node.id] if node.id in roots else _LITERALS[node.id]
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_truth(_evaluate(v, roots)) for v in node.values)
        return any(_truth(_evaluate(v, roots)) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return not _truth(_evaluate(node.operand, roots))
        value = _evaluate(node.operand, roots)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, roots)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, roots)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Attribute):
        return _member(_evaluate(node.value, roots), node.attr)
    if isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.UnaryOp):  # a negative index, checked in _check_lookup
            return _member(_evaluate(node.value, roots), -key.operand.value)  # type: ignore[attr-defined]
        return _member(_evaluate(node.value, roots), key.value)  # type: ignore[attr-defined]
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(_evaluate(e, roots) for e in node.elts)
    raise AssertionError(f"unchecked node {type(node).__name__}")  # pragma: no cover - _check rejects it


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    try:
        if isinstance(op, ast.Eq):
            return bool(left == right)
        if isinstance(op, ast.NotEq):
            return bool(left != right)
        if isinstance(op, ast.Lt):
            return bool(left < right)
        if isinstance(op, ast.LtE):
            return bool(left <= right)
        if isinstance(op, ast.Gt):
            return bool(left > right)
        if isinstance(op, ast.GtE):
            return bool(left >= right)
        if isinstance(op, ast.In):
            return left in right if _is_container(right) else False
        if isinstance(op, ast.NotIn):
            return left not in right if _is_container(right) else False
    except (TypeError, ValueError):
        return False
    raise AssertionError(f"unchecked operator {type(op).__name__}")  # pragma: no cover - _check rejects it


def _is_container(value: object) -> bool:
    return isinstance(value, str | Mapping | Sequence | frozenset | set)


def _member(value: Any, key: str | int) -> Any:
    """``value[key]`` / ``value.key``; None when missing (or when ``value`` is None)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        try:
            return value.get(key)
        except TypeError:  # pragma: no cover - keys are str or int, always hashable
            return None
    if isinstance(key, int):
        if isinstance(value, Sequence) and not isinstance(value, str | bytes) and -len(value) <= key < len(value):
            return value[key]
        return None
    if key.startswith("_") or isinstance(value, str | bytes | int | float | Sequence):
        return None  # no private names, and no methods or attributes of plain values
    try:
        found = getattr(value, key, None)
    except Exception:
        return None  # a property of an output object that raises
    return None if callable(found) else found


def _truth(value: Any) -> bool:
    try:
        return bool(value)
    except Exception:
        return False  # an odd output object's __bool__ must not break the run

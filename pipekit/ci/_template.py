"""``${NAME}`` references in commands, and secret values that must never be shown.

In an argument list a value is pasted inside its argument (it never meets a
shell). In a ``shell=True`` script it is not pasted at all: the script reads
it from an environment variable (``"${PIPEKIT_VAR_NAME}"``), which the shell
expands as data and never parses as syntax, whatever the value holds and
whatever quotes the reference stands in (the remedy GitHub recommends for
``${{ }}`` in workflow scripts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["MASK", "SHELL_VAR_PREFIX", "Masker", "Secret", "expand", "expand_shell", "references"]

#: What a secret value is replaced with wherever pipekit shows text.
MASK = "***"

# ``$$`` is a literal ``$``; ``${NAME}`` a reference; any other ``$`` is kept as is.
_TOKEN = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: The shortest line of a multi-line secret that is masked on its own (in characters, spaces aside).
_MIN_LINE = 4

#: A ``shell=True`` script reads the value of ``${NAME}`` from the environment variable ``PIPEKIT_VAR_NAME``.
SHELL_VAR_PREFIX = "PIPEKIT_VAR_"


@attrs.frozen(repr=False)
class Secret:
    """A value that pipekit masks (as ``***``) in logs, events, span attributes and stored output.

    Use it for environment entries (``env={"TOKEN": Secret(token)}``) and
    for variables or input values that commands reference with ``${NAME}``.
    ``str()`` and ``repr()`` never show the value; ``reveal()`` does.
    """

    _value: str = attrs.field(converter=str, alias="value")

    def reveal(self) -> str:
        """The secret value itself."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"


def references(template: str) -> list[str]:
    """The names ``template`` references with ``${NAME}``, in order (invalid names included)."""
    return [m.group(1) for m in _TOKEN.finditer(template) if m.group(1) is not None]


def check_template(template: str) -> list[str]:
    """Problems with the references in ``template`` (an empty or invalid name)."""
    return [f"${{{name}}} is not a valid reference" for name in references(template) if not _NAME.match(name)]


def expand(template: str, values: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Replace each ``${NAME}`` in ``template`` by ``values[NAME]`` (for an argument, a path, an env value).

    Args:
        template: The text.
        values: What names stand for; `Secret`s are revealed.

    Returns:
        The expanded text and the secret values it now contains.

    Raises:
        KeyError: Naming the first unknown reference.
    """
    secrets: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        if name not in values:
            raise KeyError(name)
        value = values[name]
        if isinstance(value, Secret):
            text = value.reveal()
            secrets.append(text)
        else:
            text = _scalar(value)
        return text

    return _TOKEN.sub(sub, template), secrets


def expand_shell(template: str, values: Mapping[str, Any]) -> tuple[str, dict[str, str], list[str]]:
    """A shell script for ``template`` in which each ``${NAME}`` reads ``PIPEKIT_VAR_NAME`` from the environment.

    The expansion is quoted for where the reference stands, so the value is
    exactly one piece of one word: ``"${PIPEKIT_VAR_NAME}"`` outside quotes,
    ``${PIPEKIT_VAR_NAME}`` inside double quotes, ``'"${PIPEKIT_VAR_NAME}"'``
    inside single quotes (close, expand, reopen). The shell never parses the
    value, so even a reference in a place the quote tracking misreads (a
    here-document) cannot inject commands: at worst the value is split into
    words or shown with quotes.

    Args:
        template: The script.
        values: What names stand for; `Secret`s are revealed into the environment.

    Returns:
        The script, the environment variables to set, and the secret values among them.

    Raises:
        KeyError: Naming the first unknown reference.
    """
    quotes = _ShellQuotes()
    parts: list[str] = []
    env: dict[str, str] = {}
    secrets: list[str] = []
    end = 0
    for match in _TOKEN.finditer(template):
        literal = template[end : match.start()]
        end = match.end()
        name = match.group(1)
        if name is None:  # ``$$``: a ``$`` the shell sees (``$$(`` is a command substitution)
            literal += "$"
        parts.append(literal)
        quotes.feed(literal)
        if name is None:
            continue
        if name not in values:
            raise KeyError(name)
        value = values[name]
        if isinstance(value, Secret):
            env[SHELL_VAR_PREFIX + name] = value.reveal()
            secrets.append(value.reveal())
        else:
            env[SHELL_VAR_PREFIX + name] = _scalar(value)
        expansion = f"${{{SHELL_VAR_PREFIX}{name}}}"
        parts.append({"double": expansion, "single": f"'\"{expansion}\"'"}.get(quotes.context(), f'"{expansion}"'))
        quotes.after_expansion()
    parts.append(template[end:])
    return "".join(parts), env, secrets


class _ShellQuotes:
    """Follows a POSIX shell script's quoting, character by character: where does the next word piece stand?

    Knows single and double quotes, backslashes, comments, and the unquoted
    contexts that ``$(...)``, ``(...)`` and backquotes open (also inside
    double quotes). Here-documents and ``case`` patterns are not recognised.
    """

    __slots__ = ("_comment", "_escaped", "_previous", "_stack")

    #: Characters after which a ``#`` starts a comment.
    _WORD_START = frozenset(" \t\n;&|()<>`")

    def __init__(self) -> None:
        self._stack = ["plain"]  # plain, paren, tick (unquoted), double, single
        self._escaped = False
        self._comment = False
        self._previous = "\n"

    def context(self) -> str:
        """``plain``, ``double`` or ``single``: the quoting at this point."""
        top = self._stack[-1]
        return top if top in ("double", "single") else "plain"

    def after_expansion(self) -> None:
        """Note that a parameter expansion was written here (it ends no quote and starts no comment)."""
        self._escaped = False
        self._previous = "}"

    def feed(self, text: str) -> None:
        """Follow ``text``."""
        stack = self._stack
        for char in text:
            top = stack[-1]
            previous = char
            if self._comment:
                self._comment = char != "\n"
            elif self._escaped:
                self._escaped = False
                previous = "_"  # an escaped character is an ordinary one (never the ``$`` of ``$(``)
            elif top == "single":
                if char == "'":
                    stack.pop()
            elif top == "double":
                if char == "\\":
                    self._escaped = True
                elif char == '"':
                    stack.pop()
                elif char == "`":
                    stack.append("tick")
                elif char == "(" and self._previous == "$":
                    stack.append("paren")
            elif char == "\\":
                self._escaped = True
            elif char == "'":
                stack.append("single")
            elif char == '"':
                stack.append("double")
            elif char == "#" and self._previous in self._WORD_START:
                self._comment = True
            elif char == "(":
                stack.append("paren")
            elif char == ")":
                if top == "paren":
                    stack.pop()
            elif char == "`":
                if top == "tick":
                    stack.pop()
                else:
                    stack.append("tick")
            self._previous = previous


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


class Masker:
    """Replaces every secret value in text with ``***``."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Output is masked a line at a time, so each line of a multi-line secret (a key file) is masked too,
        # except lines too short to be secret on their own (a JSON key file's braces).
        found = {s for s in secrets if s}
        found.update(line for s in found.copy() for line in s.splitlines() if len(line.strip()) >= _MIN_LINE)
        values = sorted(found, key=len, reverse=True)  # longest first: no partial leaks
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """``text`` with the secrets masked."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

"""``${NAME}`` references in commands, and secret values that must never be shown."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["MASK", "Masker", "Secret", "expand", "references"]

#: What a secret value is replaced with wherever pipekit shows text.
MASK = "***"

# ``$$`` is a literal ``$``; ``${NAME}`` a reference; any other ``$`` is kept as is.
_TOKEN = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


def expand(template: str, values: Mapping[str, Any], quote: Any = None) -> tuple[str, list[str]]:
    """Replace each ``${NAME}`` in ``template`` by ``values[NAME]``.

    Args:
        template: The text.
        values: What names stand for; `Secret`s are revealed.
        quote: Applied to each substituted value (``shlex.quote`` for shell commands).

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
        return quote(text) if quote is not None else text

    return _TOKEN.sub(sub, template), secrets


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
        values = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first: no partial leaks
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """``text`` with the secrets masked."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

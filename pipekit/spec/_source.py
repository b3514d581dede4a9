"""Reading YAML and JSON text into plain data, remembering the line of every value.

YAML is composed with PyYAML (safe: plain data only), whose nodes carry their
position; the data is then constructed from those nodes. JSON is decoded with
the `json` module (exact JSON semantics) and composed by PyYAML as well, for
the positions only (JSON is, positions aside, YAML's flow style).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import yaml  # type: ignore[import-untyped]

from ._errors import SpecError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "Document", "FieldPath", "format_path", "read_document"]

#: A path into the data: keys and list indexes, ``("stages", 2, "timeout")``.
FieldPath = tuple[str | int, ...]
Format = Literal["yaml", "json"]

#: The most values a file may hold (anchors and aliases expanded), against alias bombs.
MAX_VALUES: Final = 100_000
#: The deepest nesting of mappings and lists a file may have.
MAX_DEPTH: Final = 64

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


# PyYAML's safe loader, but dates stay strings (a pipeline file has no use for timestamps).
_Loader: Any = type("_Loader", (yaml.SafeLoader,), {})
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def format_path(path: FieldPath) -> str:
    """``("stages", 2, "timeout")`` as ``stages[2].timeout``; odd keys quoted: ``env["A B"]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
    return text


@attrs.frozen(kw_only=True)
class Document:
    """A file's data and where each of its values is.

    Attributes:
        source: The file name, for messages.
        data: The decoded data.
    """

    source: str
    data: Any
    _value_lines: Mapping[FieldPath, int] = attrs.field(alias="value_lines", factory=dict)
    _key_lines: Mapping[FieldPath, int] = attrs.field(alias="key_lines", factory=dict)

    def line(self, path: FieldPath) -> int | None:
        """The 1-based line of the value at ``path`` (of its key, for a mapping's), or of its closest parent."""
        while True:
            line = self._key_lines.get(path) or self._value_lines.get(path)
            if line is not None or not path:
                return line
            path = path[:-1]

    def error(self, path: FieldPath | None, message: str) -> SpecError:
        """A `SpecError` at ``path`` (None: the whole file)."""
        if path is None:
            return SpecError(message, source=self.source)
        return SpecError(message, source=self.source, path=format_path(path) or None, line=self.line(path))


def read_document(text: str, *, format: Format, source: str) -> Document:  # noqa: A002 - the documented name
    """Decode ``text`` and locate its values.

    Args:
        text: The file's text.
        format: ``"yaml"`` or ``"json"``.
        source: The file name, for messages.

    Returns:
        The document.

    Raises:
        SpecError: For malformed text, duplicate keys, or a file too large or
            too deeply nested.
    """
    if format == "json":
        return _read_json(text, source)
    if format == "yaml":
        return _read_yaml(text, source)
    raise SpecError(f"unknown format {format!r} (expected 'yaml' or 'json')", source=source)


def _read_yaml(text: str, source: str) -> Document:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("the file is empty (expected a mapping with name and stages)", source=source, line=1)
        locator = _Locator(source)
        locator.walk(node, (), 0)
        if locator.problems:
            raise SpecError.aggregate(locator.problems)
        data = loader.construct_document(node)
    except SpecError:
        raise
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, source) from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # a value its tag refuses: !!int abc
        raise SpecError(f"malformed YAML: {exc}", source=source) from None
    except RecursionError:
        raise SpecError(f"the file is nested too deeply (more than {MAX_DEPTH} levels)", source=source) from None
    finally:
        loader.dispose()
    return Document(source=source, data=data, value_lines=locator.value_lines, key_lines=locator.key_lines)


def _yaml_error(exc: yaml.MarkedYAMLError, source: str) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    parts = []
    if exc.context:
        context_line = exc.context_mark.line + 1 if exc.context_mark is not None else None
        same = context_line is None or (mark is not None and context_line == mark.line + 1)
        parts.append(exc.context if same else f"{exc.context} (line {context_line})")
    if exc.problem:
        parts.append(exc.problem)
    message = ", ".join(parts) or "cannot be parsed"
    return SpecError(f"malformed YAML: {message}", source=source, line=None if mark is None else mark.line + 1)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_json(text: str, source: str) -> Document:
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON: {exc.msg} (column {exc.colno})", source=source, line=exc.lineno) from None
    except ValueError as exc:
        raise SpecError(f"malformed JSON: {exc}", source=source) from None
    except RecursionError:
        raise SpecError(f"the file is nested too deeply (more than {MAX_DEPTH} levels)", source=source) from None
    locator = _Locator(source)
    try:
        # Tabs are only whitespace in valid JSON; PyYAML refuses them in some places.
        node = yaml.compose(text.replace("\t", " "), Loader=_Loader)
        if node is not None:
            locator.walk(node, (), 0)
    except (yaml.YAMLError, RecursionError):  # pragma: no cover - valid JSON PyYAML cannot read: no line numbers
        locator = _Locator(source)
    if locator.problems:
        raise SpecError.aggregate(locator.problems)
    return Document(source=source, data=data, value_lines=locator.value_lines, key_lines=locator.key_lines)


class _Locator:
    """Walks a composed YAML tree: the line of each value and key, duplicate keys, size limits."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.value_lines: dict[FieldPath, int] = {}
        self.key_lines: dict[FieldPath, int] = {}
        self.problems: list[SpecError] = []
        self.count = 0

    def walk(self, node: yaml.Node, path: FieldPath, depth: int) -> None:
        self.count += 1
        line = node.start_mark.line + 1
        if self.count > MAX_VALUES:
            raise SpecError(
                f"the file holds more than {MAX_VALUES} values (anchors and aliases expanded)",
                source=self.source,
                line=line,
            )
        if depth > MAX_DEPTH:
            raise SpecError(
                f"the file is nested too deeply (more than {MAX_DEPTH} levels)", source=self.source, line=line
            )
        self.value_lines.setdefault(path, line)
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*path, i), depth + 1)
        elif isinstance(node, yaml.MappingNode):
            self._walk_mapping(node, path, depth)

    def _walk_mapping(self, node: yaml.MappingNode, path: FieldPath, depth: int) -> None:
        seen: dict[str, int] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.append(value_node)
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.id}>"
            line = key_node.start_mark.line + 1
            if key in seen:
                self.problems.append(
                    SpecError(
                        f"duplicate key {key!r} (also at line {seen[key]})",
                        source=self.source,
                        path=format_path((*path, key)),
                        line=line,
                    )
                )
                continue
            seen[key] = line
            self.key_lines.setdefault((*path, key), line)
            self.walk(value_node, (*path, key), depth + 1)
        # ``<<: *defaults`` merges: their keys are located where the anchor is, unless given here.
        for value_node in merged:
            if isinstance(value_node, yaml.SequenceNode):
                for item in value_node.value:
                    self._walk_merged(item, path, depth)
            else:
                self._walk_merged(value_node, path, depth)

    def _walk_merged(self, node: yaml.Node, path: FieldPath, depth: int) -> None:
        if isinstance(node, yaml.MappingNode):
            self._walk_mapping(node, path, depth)

"""Decoding a document's data into the typed model, with one-line errors naming the field.

msgspec converts the data into the attrs classes of `pipekit.spec._model`
(types, required fields, constraints); its errors are rewritten into plain
words with the value that was given. msgspec stops at the first value it
refuses, so when it refuses one, the data is walked along the model's types
to find every such value. msgspec ignores fields attrs classes do not have,
so unknown fields are found by walking the data too.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Final, Literal, Union, get_args, get_origin

import attrs
import msgspec

from ._errors import SpecError
from ._model import PipelineSpec
from ._source import Document, FieldPath

__all__ = ["decode", "describe_value", "suggest"]

#: The top-level key a JSON file may use to name its schema (editors read it); it is not part of the model.
SCHEMA_KEY: Final = "$schema"

_MISSING: Final[Any] = object()
_PATH_PART = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]|\[(\.\.\.)\]")
_AT = re.compile(r"^(?P<message>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<types>[^`]+)`(?P<constraint>.*?)(?:, got `[^`]+`)?$", re.DOTALL)
_TYPE_WORDS: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def decode(document: Document) -> PipelineSpec:
    """Convert a document's data into a `PipelineSpec` (types and shapes only).

    Raises:
        SpecError: Listing every unknown field and every value of a wrong type.
    """
    data = document.data
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a mapping with name and stages at the top level, got {describe_value(data)}",
            source=document.source,
            line=document.line(()) or 1,
        )
    if isinstance(data.get(SCHEMA_KEY), str):
        data = {k: v for k, v in data.items() if k != SCHEMA_KEY}
    problems: list[SpecError] = []
    _find_unknown_fields(data, PipelineSpec, (), document, problems)
    spec: PipelineSpec | None = None
    try:
        spec = msgspec.convert(data, PipelineSpec)
    except msgspec.ValidationError:
        problems.extend(_type_errors(data, PipelineSpec, (), document))
    if problems:
        raise SpecError.aggregate(sorted(problems, key=lambda p: p.line or 0))
    assert spec is not None
    return spec


def describe_value(value: object) -> str:
    """A short rendering of a value for messages: ``"ten"``, ``5``, ``true``, ``null``, ``a list``."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list | tuple):
        return "a list" if value else "an empty list"
    return type(value).__name__  # pragma: no cover - the decoders produce plain data only


def suggest(word: str, choices: Sequence[str]) -> str | None:
    """The choice ``word`` was probably meant to be (case-insensitively first), or None."""
    folded = {c.casefold(): c for c in choices}
    if word.casefold() in folded:
        return folded[word.casefold()]
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# -- walking the model's types ------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = tp.__origin__
    return tp


def _members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union (flattened, Annotated removed), or the type alone."""
    tp = _unwrap(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(m for arg in get_args(tp) for m in _members(arg))
    return (tp,)


def _metadata(tp: Any) -> dict[str, Any]:
    """The ``extra`` of every `msgspec.Meta` annotating ``tp`` (outside unions), merged."""
    found: dict[str, Any] = {}
    for member in (tp, *get_args(_unwrap(tp))):
        current = member
        while get_origin(current) is typing.Annotated:
            for meta in current.__metadata__:
                if isinstance(meta, msgspec.Meta) and meta.extra:
                    found.update(meta.extra)
            current = current.__origin__
    return found


def _child_type(tp: Any, key: str | int, value: Any) -> Any:
    """The type of ``value[key]`` where ``value`` is of type ``tp``, or None."""
    for member in _members(tp):
        origin = get_origin(member)
        if attrs.has(member) and isinstance(value, dict) and isinstance(key, str):
            return _hints(member).get(key)
        if origin in (tuple, list) and isinstance(value, list) and isinstance(key, int):
            return get_args(member)[0]
        if origin is dict and isinstance(value, dict):
            return get_args(member)[1]
    return None


def _find_unknown_fields(value: Any, tp: Any, path: FieldPath, document: Document, problems: list[SpecError]) -> None:
    for member in _members(tp):
        origin = get_origin(member)
        if attrs.has(member) and isinstance(value, dict):
            hints = _hints(member)
            for key, item in value.items():
                name = str(key)
                if name not in hints:
                    guess = suggest(name, list(hints)) if isinstance(key, str) else None
                    hint = f" (did you mean {guess!r}?)" if guess else ""
                    problems.append(document.error((*path, name), f"unknown field{hint}"))
                else:
                    _find_unknown_fields(item, hints[name], (*path, name), document, problems)
            return
        if origin in (tuple, list) and isinstance(value, list):
            for i, item in enumerate(value):
                _find_unknown_fields(item, get_args(member)[0], (*path, i), document, problems)
            return
        if origin is dict and isinstance(value, dict):
            for key, item in value.items():
                _find_unknown_fields(item, get_args(member)[1], (*path, str(key)), document, problems)
            return


def _type_errors(value: Any, tp: Any, path: FieldPath, document: Document) -> list[SpecError]:
    """One problem per value in ``value`` (of type ``tp``, at ``path``) that msgspec refuses; none if it converts.

    Mappings of model classes, lists and dicts are looked into member by
    member, so that every wrong value is found, not only msgspec's first;
    a value refused as a whole (a wrong type, an empty list) is one problem.
    """
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        error = str(exc)
    else:
        return []
    found: list[SpecError] = []
    for member in _members(tp):
        origin = get_origin(member)
        if attrs.has(member) and isinstance(value, dict):
            hints = _hints(member)
            for key, item in value.items():
                if key in hints:
                    found.extend(_type_errors(item, hints[key], (*path, key), document))
            for field in attrs.fields(member):
                if field.default is attrs.NOTHING and field.name not in value:
                    found.append(document.error(path, f"missing required field {field.name!r}"))
            break
        if origin in (tuple, list) and isinstance(value, list):
            for i, item in enumerate(value):
                found.extend(_type_errors(item, get_args(member)[0], (*path, i), document))
            break
        if origin is dict and isinstance(value, dict):
            for key, item in value.items():
                found.extend(_type_errors(item, get_args(member)[1], (*path, str(key)), document))
            break
    return found or [_translate(error, value, document, tp=tp, at=path)]


# -- msgspec's errors in plain words ------------------------------------------------


def _translate(error: str, data: Any, document: Document, *, tp: Any = PipelineSpec, at: FieldPath = ()) -> SpecError:
    """Rewrite a msgspec validation error as a `SpecError` at the field's path and line.

    ``data`` is what was converted to ``tp``; it is at ``at`` in the document.
    """
    match = _AT.match(error)
    assert match is not None  # the pattern matches any text
    raw = match["message"]
    path: list[str | int] = list(at)
    value: Any = data
    for name, index, ellipsis in _PATH_PART.findall(match["path"] or ""):
        if ellipsis:  # a dict value: msgspec does not say which key, find the first one that fails
            key: str | int = _failing_key(value, tp)
        else:
            key = name or int(index)
        tp = _child_type(tp, key, value) if tp is not None else None
        value = _get(value, key)
        path.append(key)
    if match["key"] and isinstance(value, dict):  # a key of a mapping, not a value
        odd = next((k for k in value if not isinstance(k, str)), _MISSING)
        if odd is not _MISSING:
            quoted = json.dumps(str(odd))
            return document.error(tuple(path), f"keys must be strings, got {describe_value(odd)} (quote it: {quoted})")
    return document.error(tuple(path), _message(raw, tp, value))


def _get(value: Any, key: str | int) -> Any:
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    if isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
        return value[key]
    return _MISSING


def _failing_key(value: Any, tp: Any) -> str:
    if isinstance(value, dict):
        item_type = _child_type(tp, "", value)
        for key, item in value.items():
            try:
                msgspec.convert(item, item_type)
            except (msgspec.ValidationError, TypeError):
                return str(key)
    return "..."  # pragma: no cover - msgspec reports a dict value only when one fails


def _message(raw: str, tp: Any, value: Any) -> str:
    given = "" if value is _MISSING else f", got {describe_value(value)}"
    kind = _metadata(tp).get("kind") if tp is not None else None
    if kind in ("seconds", "delay") and value is not _MISSING:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"expected a number of seconds {'> 0' if kind == 'seconds' else '>= 0'}{given}"
        return f"expected a number of seconds{given}"
    if raw.startswith("Invalid enum value"):
        choices = [c for m in _members(tp) if get_origin(m) is Literal for c in get_args(m)]
        guess = suggest(value, choices) if isinstance(value, str) else None
        hint = f" (did you mean {json.dumps(guess)}?)" if guess else ""
        return f"expected one of {', '.join(map(json.dumps, choices))}{given}{hint}"
    missing = re.fullmatch(r"Object missing required field `(\w+)`", raw)
    if missing:
        return f"missing required field {missing[1]!r}"
    expected = _EXPECTED.match(raw)
    if expected:
        return f"expected {_describe(expected['types'], expected['constraint'].strip())}{given}"
    return raw[:1].lower() + raw[1:]  # pragma: no cover - every message msgspec gives the model is handled above


def _describe(type_names: str, constraint: str) -> str:
    """``str | array`` and ``of length >= 1`` in words."""
    names = sorted(type_names.split(" | "), key=lambda n: list(_TYPE_WORDS).index(n) if n in _TYPE_WORDS else 99)
    if "int" in names and "float" in names:
        names.remove("int")
    if "null" in names and len(names) > 1:
        names.remove("null")  # null is "not given": worth no mention
    if names == ["bool"]:
        return "true or false"
    if constraint == "of length >= 1":
        return {"str": "a non-empty string", "array": "a non-empty list"}.get(names[0], f"a non-empty {names[0]}")
    words = [_TYPE_WORDS.get(n, n) for n in names]
    text = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    if constraint:
        bound = re.fullmatch(r"([<>]=?) (-?\d+(?:\.\d+)?)", constraint)
        text += f" {bound[1]} {float(bound[2]):g}" if bound else f" {constraint}"
    return text

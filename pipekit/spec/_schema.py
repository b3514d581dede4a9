"""The JSON Schema of pipeline files, generated from the model by msgspec."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Final

import msgspec

from ._model import MODEL_CLASSES, PipelineSpec

__all__ = ["DOCS_PATH", "SCHEMA_PATH", "docs_with_schema", "json_schema", "schema_text"]

#: Where the generated schema is shipped, beside this module.
SCHEMA_PATH: Final = Path(__file__).with_name("pipeline.schema.json")
#: The documentation page that shows the schema (in a source checkout; absent from an installed pipekit).
DOCS_PATH: Final = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
_DOCS_START: Final = "<!-- the whole schema, written by `python -m pipekit.spec`: do not edit -->"
_DOCS_END: Final = "<!-- end of the whole schema -->"
_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
_SECTION = re.compile(r"^(?:Attributes|Args|Example|Examples|Note):\s*$", re.MULTILINE)
_ENTRY = re.compile(r"^    (\w+): (.*(?:\n {8,}.*)*)", re.MULTILINE)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of pipeline files, for editors and validators.

    It is generated from the model (`msgspec.json.schema`); each object
    rejects unknown fields, and descriptions come from the model's docstrings.
    ``pipekit/spec/pipeline.schema.json`` ships it (``python -m pipekit.spec``
    regenerates that file).

    Returns:
        The schema, a new dict each call.
    """
    generated = msgspec.json.schema(PipelineSpec)
    definitions: dict[str, Any] = generated["$defs"]
    for cls in MODEL_CLASSES:
        definition = definitions[cls.__name__]
        summary, fields = _docstring(cls)
        definition["description"] = summary
        for name, text in fields.items():
            definition["properties"][name] = {"description": text, **definition["properties"][name]}
        definition["additionalProperties"] = False
    root = definitions[PipelineSpec.__name__]
    root["properties"] = {
        "$schema": {"description": "The schema of this file (for editors).", "type": "string"},
        **root["properties"],
    }
    schema = {
        "$schema": _DIALECT,
        "title": "pipekit pipeline",
        "description": "A pipekit pipeline file (YAML or JSON), loaded with pipekit.spec.load().",
        "$ref": generated["$ref"],
        "$defs": definitions,
    }
    plain: dict[str, Any] = json.loads(json.dumps(schema))  # plain JSON values: defaults like (0,) become lists
    return plain


def schema_text() -> str:
    """`json_schema` as the shipped file's text: indented JSON and a final newline."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _docstring(cls: type) -> tuple[str, dict[str, str]]:
    """A class docstring's text before its sections, and its ``Attributes:`` entries, unwrapped."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = _SECTION.search(doc)
    summary = _unwrap(doc[: section.start()] if section else doc)
    fields: dict[str, str] = {}
    attributes = re.search(r"^Attributes:\s*\n((?:    .*\n?|\s*\n)*)", doc, re.MULTILINE)
    if attributes:
        for match in _ENTRY.finditer(attributes[1]):
            fields[match[1]] = _unwrap(match[2])
    return summary, fields


def _unwrap(text: str) -> str:
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(p for p in paragraphs if p).replace("``", "`")


def docs_with_schema(page: str) -> str:
    """``page`` (``docs/spec.md``'s text) with the schema shown between its markers brought up to date.

    Raises:
        ValueError: If the page has no markers.
    """
    start, end = page.find(_DOCS_START), page.find(_DOCS_END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {_DOCS_START!r} ... {_DOCS_END!r} markers")
    lines = ["```json", *schema_text().splitlines(), "```"]
    block = "\n".join(f"    {line}" if line else "" for line in lines)
    shown = f'\n\n??? example "The whole schema (what `pipekit schema` prints)"\n\n{block}\n\n'
    return page[: start + len(_DOCS_START)] + shown + page[end:]

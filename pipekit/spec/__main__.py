"""``python -m pipekit.spec``: write (or, with ``--check``, verify) the shipped JSON Schema, and the docs' copy."""

from __future__ import annotations

import sys
from pathlib import Path

from ._schema import DOCS_PATH, SCHEMA_PATH, docs_with_schema, schema_text


def _wanted() -> list[tuple[Path, str]]:
    """Each file to keep up to date, and the text it should have."""
    wanted = [(SCHEMA_PATH, schema_text())]
    if DOCS_PATH.exists():  # a source checkout
        wanted.append((DOCS_PATH, docs_with_schema(DOCS_PATH.read_text(encoding="utf-8"))))
    return wanted


def main(argv: list[str]) -> int:
    """Write ``pipekit/spec/pipeline.schema.json`` and the copy in ``docs/spec.md``; ``--check``: fail if one is stale.

    Args:
        argv: The command-line arguments (without the program name).

    Returns:
        The exit status.
    """
    if argv == ["--check"]:
        stale = [path for path, text in _wanted() if not path.exists() or path.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is out of date; run: python -m pipekit.spec", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print("usage: python -m pipekit.spec [--check]", file=sys.stderr)
        return 2
    for path, text in _wanted():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m pipekit.spec``: write (or, with ``--check``, verify) the shipped JSON Schema."""

from __future__ import annotations

import sys

from ._schema import SCHEMA_PATH, schema_text


def main(argv: list[str]) -> int:
    """Write ``pipekit/spec/pipeline.schema.json``; with ``--check``, fail if it is out of date.

    Args:
        argv: The command-line arguments (without the program name).

    Returns:
        The exit status.
    """
    text = schema_text()
    if argv == ["--check"]:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is out of date; run: python -m pipekit.spec", file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python -m pipekit.spec [--check]", file=sys.stderr)
        return 2
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

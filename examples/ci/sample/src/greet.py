"""Greets people: the tiny project the CI demo lints, tests and builds."""

from __future__ import annotations

import sys


def greeting(name: str) -> str:
    """Return a greeting for ``name``."""
    return f"Hello, {name.strip() or 'world'}!"


def main() -> None:
    """Print a greeting for the first argument."""
    print(greeting(sys.argv[1] if len(sys.argv) > 1 else ""))


if __name__ == "__main__":
    main()

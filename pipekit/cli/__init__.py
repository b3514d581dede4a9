"""The ``pipekit`` command (needs the ``cli`` extra)."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``pipekit`` command."""
    from pipekit._exports import require_extra  # noqa: PLC0415 - keeps ``import pipekit.cli`` cheap

    try:
        require_extra("the pipekit command", "cli", ("typer", "rich", "yaml", "msgspec", "httpx", "packaging"))
    except ModuleNotFoundError as exc:
        sys.exit(f"pipekit: error: {exc}")
    from ._app import main as _main  # noqa: PLC0415

    _main()

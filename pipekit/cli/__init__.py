"""The ``pipekit`` command (needs the ``cli`` extra)."""

from __future__ import annotations


def main() -> None:
    """Run the ``pipekit`` command."""
    from ._app import main as _main  # noqa: PLC0415 - keeps ``import pipekit.cli`` cheap

    _main()

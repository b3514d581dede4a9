"""``python -m pipekit.cli``: the ``pipekit`` command."""

from __future__ import annotations

from ._app import main

if __name__ == "__main__":
    main()

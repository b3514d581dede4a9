"""``python -m benchmarks``: run the suite (see `benchmarks.suite`)."""

from __future__ import annotations

from .suite import main

raise SystemExit(main())

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TestBenchmarkScripts:
    def test_core_benchmark_smoke(self) -> None:
        """The core benchmark runs in smoke mode and prints every scenario for both backends."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--smoke"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for scenario in ("sequential[asyncio]", "sequential[trio]", "parallel[asyncio]", "parallel[trio]"):
            assert scenario in result.stdout

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One smoke run of the whole suite, its JSON written to a temporary file."""
    output = tmp_path_factory.mktemp("bench") / "smoke.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, output


class TestBenchmarkSuite:
    def test_smoke_run_succeeds(self, smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
        """The suite runs in smoke mode and exits 0."""
        result, _ = smoke
        assert result.returncode == 0, result.stderr

    def test_smoke_run_prints_every_scenario(self, smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
        """Every scenario appears in the table, scenarios 1 and 3 on both backends; the peer runs or says why not."""
        from benchmarks.suite import SCENARIO_NAMES

        result, _ = smoke
        lines = result.stdout.splitlines()
        for name in SCENARIO_NAMES:
            if name == "1 peer: prefect" and "skipped: prefect" in result.stdout:
                continue
            assert any(line.startswith(f"{name}  ") for line in lines), name
        for name in ("1 sequential", "2 policies", "3 fan-out"):
            for backend in ("asyncio", "trio"):
                assert any(line.startswith(f"{name}  ") and f"  {backend}  " in line for line in lines), (name, backend)

    def test_smoke_json_has_rows_and_machine(self, smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
        """The JSON describes the machine and holds one status per row."""
        _, output = smoke
        data = json.loads(output.read_text())
        assert data["machine"]["cpu"]
        assert data["settings"]["smoke"] is True
        assert data["rows"]
        assert {row["status"] for row in data["rows"]} <= {"PASS", "MISS", "—"}


class TestReadme:
    def test_readme_section_regenerates(self, tmp_path: Path) -> None:
        """The README's results section is rebuilt from a JSON between its markers, the rest kept."""
        from benchmarks._report import END, START, update_readme

        readme = tmp_path / "README.md"
        readme.write_text(f"intro\n\n{START}\nold table\n{END}\n\noutro\n")
        data = {
            "machine": {
                "date": "2026-01-01T00:00:00+00:00",
                "cpu": "Test CPU",
                "cores": 2,
                "usable_cores": 2,
                "python": "CPython 3.11.0",
                "platform": "Linux",
                "commit": "abc1234",
                "versions": {"anyio": "4.0"},
            },
            "settings": {"rounds": 3, "warmup": 1},
            "duration_s": 12.0,
            "rows": [
                {
                    "scenario": "1 sequential",
                    "backend": "asyncio",
                    "case": "N=10",
                    "baseline": "floor",
                    "unit": "µs/stage",
                    "baseline_value": 0.1,
                    "pipekit_value": 5.0,
                    "kind": "overhead",
                    "result": 4.9,
                    "target": 10.0,
                    "higher_is_better": False,
                    "status": "PASS",
                }
            ],
            "legend": {"floor": "a plain loop"},
            "notes": ["skipped: prefect not installed"],
        }
        update_readme(data, readme)
        text = readme.read_text()
        assert text.startswith("intro\n\n")
        assert text.endswith("\n\noutro\n")
        assert "old table" not in text
        assert "| 1 sequential | asyncio | N=10 | floor |" in text
        assert "Test CPU" in text
        assert "skipped: prefect not installed" in text

"""The CLI demo: ``examples/ci/pipeline.yaml`` through ``pipekit``, recorded in a SQLite run history.

Run it with ``make demo``. Each command is printed before it runs, as in a
terminal session:

1. ``pipekit validate`` checks the file, its validators and every stage;
2. ``pipekit run`` lints, tests and builds ``examples/ci/sample`` (a flaky
   smoke test is retried), publishes it, then stops at ``verify`` because the
   release is not approved yet: ``publish`` is rolled back and the command
   exits 1;
3. ``pipekit runs`` and ``pipekit show`` look at what was recorded;
4. the release is approved, and ``pipekit retry RUN --from-failed`` resumes:
   the stages that succeeded are restored from the history, not run again;
5. ``pipekit stats`` sums the pipeline up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".pipekit" / "demo"
DB = WORK / "pipekit.db"
FILE = "examples/ci/pipeline.yaml"
PIPEKIT = [sys.executable, "-m", "pipekit.cli"]
# The pipeline's commands run `python`: make it this environment's (with ruff and pytest).
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def pipekit(*args: str, expect: int = 0, capture: bool = False) -> str:
    """Run ``pipekit ARGS`` from the repository root, as a user would; check its exit status."""
    print(f"\n$ pipekit {shlex.join(args)}", flush=True)
    done = subprocess.run([*PIPEKIT, *args], cwd=ROOT, env=ENV, check=False, text=True, capture_output=capture)
    if done.returncode != expect:
        sys.exit(f"`pipekit {shlex.join(args)}` exited with {done.returncode}, expected {expect}")
    print(f"(exit status {done.returncode})", flush=True)
    return done.stdout if capture else ""


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    db = ["--db", str(DB.relative_to(ROOT))]
    pipekit("validate", FILE, "--input", "version=0.1.0")
    pipekit("run", FILE, "--input", "version=0.1.0", *db, expect=1)
    pipekit("runs", *db)
    (failed,) = json.loads(pipekit("runs", "--json", "--limit", "1", *db, capture=True))["runs"]
    run_id = failed["id"][:12]
    pipekit("show", run_id, *db)
    print("\n$ touch .pipekit/demo/approved   # approve the release")
    (WORK / "approved").touch()
    pipekit("retry", run_id, "--from-failed", *db)
    pipekit("stats", *db)


if __name__ == "__main__":
    main()

"""The CI demo in Python: lint, test and build the tiny project in ``sample/`` with real commands.

Run it with ``make demo`` (or ``python examples/ci/ci.py`` from the repository
root). It shows, with real processes:

1. a dry run that lists every missing tool and environment variable at once;
2. a CI run: lint and test run concurrently, their output streamed line by
   line; a flaky smoke test is retried; the build publishes an artifact; the
   deploy token (a secret) is masked in everything printed;
3. a failing run: an integration test that hangs is stopped by its timeout,
   and its whole process tree is killed (checked with psutil); the publish
   stage's rollback command then removes the artifact.

``pipekit run examples/ci/ci.py`` runs the same ``pipeline`` from the CLI.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anyio
import psutil  # type: ignore[import-untyped]
import structlog

import pipekit as pk
from pipekit import ci

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "ci" / "sample"
WORK = ROOT / ".pipekit" / "demo-py"
PY = sys.executable

retry_fast = pk.RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0)

pipeline = (
    pk.Pipeline("greet-ci-py")
    .with_variables(work=str(WORK), version="0.1.0")
    .with_validators(ci.ToolValidator([ci.Tool("python", min_version="3.11")]))
    .add_parallel_stages(
        ci.CommandStage("lint", [PY, "-m", "ruff", "check", "src", "tests"], cwd=SAMPLE, timeout=60),
        ci.PytestStage(["-q"], python=PY, cwd=SAMPLE, timeout=120),
    )
    .add_stage(
        ci.CommandStage(
            "smoke",
            # Fails the first time (a "flaky network"), passes when retried.
            "if [ -f '${work}/smoke-ran' ]; then echo 'smoke passed'; exit 0; fi;"
            " mkdir -p '${work}' && touch '${work}/smoke-ran'; echo 'flaky network' >&2; exit 1",
            shell=True,
            retry=retry_fast,
        )
    )
    .add_stage(
        ci.CommandStage(
            "build",
            [PY, "-m", "zipapp", "src", "-m", "greet:main", "-o", "${work}/greet-${version}.pyz"],
            cwd=SAMPLE,
        )
    )
    .add_stage(
        ci.CommandStage(
            "publish",
            f"mkdir -p '${{work}}/releases' && cp '${{work}}/greet-${{version}}.pyz' '${{work}}/releases/'"
            f" && echo \"published with token $DEPLOY_TOKEN\" && {PY} '${{work}}/releases/greet-${{version}}.pyz' CI",
            shell=True,
            env={"DEPLOY_TOKEN": ci.Secret("tok-3f9c2ab-very-secret")},
            rollback_command="rm -f '${work}/releases/greet-${version}.pyz' && echo 'release withdrawn'",
        )
    )
)

# A hanging integration test: its shell starts a child that sleeps; the timeout ends both.
hanging = ci.CommandStage(
    "integration",
    "echo 'starting the test server'; sleep 300 & echo $! > '${work}/server.pid'; wait",
    shell=True,
    timeout=1.0,
    kill_grace=0.5,
)

# Asks for what this machine does not have, to show a dry run reporting it all at once.
demanding = (
    pk.Pipeline("needs-more")
    .with_validators(
        ci.EnvVarValidator(["PIPEKIT_DEMO_REGISTRY", "PIPEKIT_DEMO_TOKEN"]),
        ci.ToolValidator([ci.Tool("python", min_version="3.11"), ci.Tool("pipekit-demo-go", min_version="1.21")]),
    )
    .add_stage(ci.GoModDownloadStage())
    .add_stage(ci.CommandStage("deploy", "kubectl-pipekit-demo apply -f ${manifest}"))
)


async def show(event: pk.Event) -> None:
    """Print a line per event worth seeing (the CLI's ``pipekit run`` has a live display)."""
    if isinstance(event, ci.OutputLine):
        print(f"    {event.stage:>11} | {event.line}")
    elif isinstance(event, pk.StageStarted):
        print(f"  > {event.stage}")
    elif isinstance(event, pk.StageRetrying):
        print(f"  ~ {event.stage}: attempt {event.attempt} failed, retrying in {event.delay:.1f}s")
    elif isinstance(event, pk.StageSucceeded):
        print(f"  ✓ {event.stage} ({event.duration:.2f}s)")
    elif isinstance(event, pk.StageFailed):
        print(f"  ✗ {event.stage}: {event.error}")
    elif isinstance(event, pk.StageRolledBack):
        print(f"  ↩ {event.stage} rolled back")


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    for stale in WORK.glob("**/*"):
        if stale.is_file():
            stale.unlink()

    print("1. dry run of a pipeline that needs more than this machine has:")
    response = await demanding.execute(pk.PipelineRequest(options=pk.RequestOptions(dry_run=True)))
    assert isinstance(response.error, pk.ValidationError)
    for problem in response.error.errors:
        print(f"   - {problem}")

    print("\n2. CI run of examples/ci/sample:")
    response = await pipeline.execute(hooks=[show])
    print(f"   => {response.status.value}; artifact: {sorted(p.name for p in (WORK / 'releases').iterdir())}")
    assert response.status is pk.Status.SUCCEEDED, response.summary()

    print("\n3. the same run with a hanging integration test after publish:")
    failing = pipeline.add_stage(hanging)
    response = await failing.execute(hooks=[show])
    server = int((WORK / "server.pid").read_text())
    alive = psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE
    print(f"   => {response.status.value}: {response.error}")
    print(f"   test server (pid {server}) still running: {alive}")
    print(f"   releases left: {sorted(p.name for p in (WORK / 'releases').iterdir())}")
    assert response.status is pk.Status.TIMED_OUT
    assert not alive


if __name__ == "__main__":
    anyio.run(main)

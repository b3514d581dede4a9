"""The pipekit demo: a release pipeline with parallel checks, a flaky upload, and a rollback.

Run it with ``make demo``. Two requests go through the same pipeline in an
Engine: the staging release succeeds (after the artifact upload is retried),
the production release fails at the smoke test, and everything that had
already happened is compensated in reverse dependency order.
"""

from __future__ import annotations

import logging
import sys

import anyio
import structlog

import pipekit as pk

# An application configures logging; the library never does. Keep the demo's
# output to the live event lines below, plus errors.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

RELEASE = pk.Key[str]("release")
upload_attempts: dict[str, int] = {}


@pk.stage
async def checkout(ctx: pk.StageContext) -> str:
    """Pin the commit being released."""
    ctx[RELEASE] = f"v{ctx.input['version']}-{ctx.input['env']}"
    return "3f9c2ab"


@pk.stage
async def lint(ctx: pk.StageContext) -> str:
    await anyio.sleep(0.02)
    return "0 issues"


@pk.stage
async def unit_tests(ctx: pk.StageContext) -> str:
    await anyio.sleep(0.05)
    return "412 passed"


@pk.stage
async def build_image(ctx: pk.StageContext) -> str:
    await anyio.sleep(0.04)
    return f"registry.local/shop:{ctx[RELEASE]}"


async def delete_artifact(ctx: pk.StageContext) -> None:
    await anyio.sleep(0.01)


@pk.stage(name="upload_artifact", rollback=delete_artifact)
async def upload_artifact(ctx: pk.StageContext) -> str:
    """A flaky upload: the first two attempts of each release hit a timeout."""
    release = ctx[RELEASE]
    upload_attempts[release] = upload_attempts.get(release, 0) + 1
    if upload_attempts[release] < 3:
        raise ConnectionError("artifact store timed out")
    return f"s3://artifacts/{release}.tar.gz"


class MigrateDatabase(pk.BaseStage):
    """A schema migration that knows how to undo itself."""

    name = "migrate_db"

    async def execute(self, ctx: pk.StageContext) -> str:
        await anyio.sleep(0.02)
        return "schema 41 -> 42"

    async def rollback(self, ctx: pk.StageContext) -> None:
        await anyio.sleep(0.02)


async def route_back(ctx: pk.StageContext) -> None:
    await anyio.sleep(0.01)


@pk.stage(name="switch_traffic", rollback=route_back)
async def switch_traffic(ctx: pk.StageContext) -> str:
    return f"100% -> {ctx.outputs['build_image']}"


@pk.stage
async def smoke_test(ctx: pk.StageContext) -> str:
    if ctx.input["env"] == "production":
        raise RuntimeError("checkout page returned HTTP 502")
    return "ok"


pipeline = (
    pk.Pipeline("release")
    .add_stage(checkout)
    .add_parallel_stages(lint, unit_tests, build_image, limit=2)
    .add_stage(
        upload_artifact,
        retry=pk.ExponentialBackoff(max_attempts=4, initial=0.05, maximum=0.2, jitter=0.0),
        timeout=2.0,
    )
    .add_stage(MigrateDatabase())
    .add_stage(switch_traffic)
    .add_stage(smoke_test, timeout=1.0)
    .with_timeout(30)
)


async def print_event(event: pk.Event) -> None:
    """A hook: one readable line per event."""
    env = "staging   " if "staging" in event.request_id else "production"
    where = f" {event.stage}" if event.stage else ""
    extra = ""
    if isinstance(event, pk.StageRetrying):
        extra = f" (attempt {event.attempt} failed: {event.error}; retrying in {event.delay:.2f}s)"
    elif isinstance(event, pk.StageFailed):
        extra = f" ({type(event.error).__name__}: {event.error})"
    elif isinstance(event, pk.StageSkipped | pk.StageCancelled):
        extra = f" ({event.reason})"
    elif isinstance(event, pk.PipelineFinished):
        extra = f" -> {event.status.value}"
    print(f"  [{env}] {event.kind:<18}{where}{extra}")


async def main() -> int:
    print("Running the 'release' pipeline for staging and production (max 2 at once)...\n")
    async with pk.Engine(max_concurrent=2, hooks=[print_event]) as engine:
        staging = await engine.submit(
            pipeline, pk.PipelineRequest(id="staging-1", type="release", input={"version": "2.4.0", "env": "staging"})
        )
        production = await engine.submit(
            pipeline,
            pk.PipelineRequest(id="production-1", type="release", input={"version": "2.4.0", "env": "production"}),
        )
        results = [await staging.wait(), await production.wait()]
        metrics = engine.metrics("release")

    for response in results:
        print()
        print(response.summary())
    print()
    print(
        f"metrics: {metrics.total_executions} executions, success rate {metrics.success_rate:.0%}, "
        f"p95 {metrics.p95:.3f}s"
    )

    # The demo checks its own story, so `make demo` fails loudly if it ever stops being true.
    ok_run, failed_run = results
    expected = (
        ok_run.ok
        and ok_run.stages["upload_artifact"].attempts == 3
        and failed_run.status is pk.Status.FAILED
        and isinstance(failed_run.error, pk.StageFailedError)
        and failed_run.error.stage == "smoke_test"
        and all(failed_run.stages[name].rolled_back for name in ("upload_artifact", "migrate_db", "switch_traffic"))
    )
    print("demo outcome:", "as expected" if expected else "UNEXPECTED")
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))

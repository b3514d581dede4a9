"""Scenarios 1 and 2: a sequential pipeline of N no-op stages.

1. No policies, telemetry off: pipekit's µs per stage above the floor (a plain
   loop awaiting the same stages), and against the hand-written equivalent.
2. Retry + timeout configured on every stage, every stage succeeding first
   time: against the hand-written equivalent, with telemetry off (the API's
   no-ops) and on (an SDK with a batch span processor and a discarding
   exporter, the same providers for both).
"""

from __future__ import annotations

from functools import partial

import pipekit as pk

from ._baselines import HandWritten, chain, floor_loop, noops
from ._harness import (
    OFF,
    Row,
    Scenario,
    Settings,
    compare,
    median,
    paired_difference,
    paired_ratio,
    sdk_telemetry,
    summarise,
)

SEQUENTIAL = "1 sequential"
POLICIES = "2 policies"
ATTEMPTS = 3
TIMEOUT = 30.0


async def run(settings: Settings, backend: str) -> Scenario:
    n = settings.seq_stages
    stages = noops(n)
    plain = chain("sequential", stages)
    policy = pk.RetryPolicy(max_attempts=ATTEMPTS)
    guarded = chain("sequential", stages, retry=policy, timeout=TIMEOUT)
    us = 1e6 / n

    # Telemetry off: the process-global providers are the API's no-op proxies.
    by_hand = HandWritten("sequential", OFF, attempts=ATTEMPTS, timeout=TIMEOUT)
    off = await compare(
        {
            "floor": partial(floor_loop, stages),
            "hand-written": partial(by_hand.run, stages),
            "pipekit": plain.execute,
            "pipekit+policies": guarded.execute,
        },
        settings,
    )

    # Telemetry on: an SDK passed explicitly to both pipekit and the hand-written code.
    with sdk_telemetry() as telemetry:
        by_hand_on = HandWritten("sequential", telemetry, attempts=ATTEMPTS, timeout=TIMEOUT)
        on = await compare(
            {
                "hand-written": partial(by_hand_on.run, stages),
                "pipekit+policies": partial(
                    guarded.execute,
                    tracer_provider=telemetry.tracer_provider,
                    meter_provider=telemetry.meter_provider,
                ),
                "pipekit+policies, telemetry off": guarded.execute,
            },
            settings,
            before_round=telemetry.flush,
        )

    case = f"N={n}"
    rows = [
        Row(
            scenario=SEQUENTIAL,
            backend=backend,
            case=f"{case}, no policies, telemetry off",
            baseline="floor",
            unit="µs/stage",
            baseline_value=median(off["floor"]) * us,
            pipekit_value=median(off["pipekit"]) * us,
            kind="overhead",
            result=paired_difference(off, "pipekit", "floor") * us,
            target=10.0,
        ),
        Row(
            scenario=SEQUENTIAL,
            backend=backend,
            case=f"{case}, no policies, telemetry off",
            baseline="hand-written",
            unit="µs/stage",
            baseline_value=median(off["hand-written"]) * us,
            pipekit_value=median(off["pipekit"]) * us,
            kind="ratio",
            result=paired_ratio(off, "pipekit", "hand-written"),
        ),
        Row(
            scenario=POLICIES,
            backend=backend,
            case=f"{case}, retry + timeout, telemetry off",
            baseline="hand-written",
            unit="µs/stage",
            baseline_value=median(off["hand-written"]) * us,
            pipekit_value=median(off["pipekit+policies"]) * us,
            kind="ratio",
            result=paired_ratio(off, "pipekit+policies", "hand-written"),
            target=1.0,
        ),
        Row(
            scenario=POLICIES,
            backend=backend,
            case=f"{case}, retry + timeout, telemetry on (SDK)",
            baseline="hand-written + SDK",
            unit="µs/stage",
            baseline_value=median(on["hand-written"]) * us,
            pipekit_value=median(on["pipekit+policies"]) * us,
            kind="ratio",
            result=paired_ratio(on, "pipekit+policies", "hand-written"),
            target=0.8,
        ),
        Row(
            scenario=POLICIES,
            backend=backend,
            case=f"{case}, retry + timeout: cost of the SDK",
            baseline="same, telemetry off",
            unit="µs/stage",
            baseline_value=median(on["pipekit+policies, telemetry off"]) * us,
            pipekit_value=median(on["pipekit+policies"]) * us,
            kind="overhead",
            result=paired_difference(on, "pipekit+policies", "pipekit+policies, telemetry off") * us,
        ),
    ]
    details = {
        "µs/stage, telemetry off": summarise(off, us),
        "µs/stage, telemetry on": summarise(on, us),
    }
    return Scenario(rows=rows, details=details)

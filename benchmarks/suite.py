"""Run the benchmark suite: print the table, write the JSON, regenerate the README.

Usage, from the repository root::

    python -m benchmarks                 # full run (a few minutes), writes benchmarks/results/latest.json
    python -m benchmarks --smoke         # tiny sizes, one round, a few seconds; writes nothing
    python -m benchmarks --readme        # regenerate the README's table from the JSON (no run)
    python -m benchmarks --only 3 --backend trio   # one scenario on one backend, e.g. to profile it

Every scenario measures its baselines and pipekit in the same process and
run; the table reports ratios and µs per stage, each a median over rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from . import (
    scenario_commands,
    scenario_engine,
    scenario_graph,
    scenario_history,
    scenario_parallel,
    scenario_peers,
    scenario_sequential,
)
from ._baselines import LEGEND
from ._harness import FULL, SMOKE, Scenario, Settings, assert_no_global_sdk, configure_logging, describe_machine
from ._report import RESULTS, legend, misses, text_table, update_readme, write_json

Runner = Callable[[Settings, str], Awaitable[Scenario]]

#: (key for --only, the scenario names it reports, runner, backends it runs on)
SCENARIOS: tuple[tuple[str, tuple[str, ...], Runner, tuple[str, ...]], ...] = (
    ("1", (scenario_sequential.SEQUENTIAL, scenario_sequential.POLICIES), scenario_sequential.run, ("asyncio", "trio")),
    ("3", (scenario_parallel.FAN_OUT,), scenario_parallel.run, ("asyncio", "trio")),
    ("4", (scenario_graph.GRAPH,), scenario_graph.run, ("asyncio", "trio")),
    ("5", (scenario_engine.ENGINE, scenario_engine.ROLLBACK), scenario_engine.run, ("asyncio", "trio")),
    ("7", (scenario_commands.COMMANDS, scenario_commands.OUTPUT), scenario_commands.run, ("asyncio", "trio")),
    ("9", (scenario_history.RECORDING,), scenario_history.run, ("asyncio", "trio")),
    ("prefect", (scenario_peers.PEER,), scenario_peers.run, ("asyncio",)),
)

#: Every scenario name the table shows (the smoke test checks them all).
SCENARIO_NAMES = tuple(name for _, names, _, _ in SCENARIOS for name in names)

#: What every baseline the table names is.
BASELINES = {**LEGEND, **scenario_commands.LEGEND, **scenario_history.LEGEND}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one round; writes nothing")
    parser.add_argument("--readme", action="store_true", help="regenerate benchmarks/README.md from the JSON, no run")
    parser.add_argument("--output", type=Path, help=f"where the JSON goes (default {RESULTS}; none with --smoke)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[key for key, _, _, _ in SCENARIOS],
        help="run only these scenarios (2 runs with 1, 8 with 7; 6 is the backends)",
    )
    parser.add_argument("--backend", choices=["asyncio", "trio"], help="run on this backend only")
    parser.add_argument("--rounds", type=int, help="timed rounds per variant (overrides the mode's default)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    return parser


def run_suite(settings: Settings, only: Sequence[str] | None, backend: str | None) -> dict[str, Any]:
    """Run the selected scenarios on their backends; return everything the JSON holds."""
    assert_no_global_sdk()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    notes: list[str] = []
    for key, names, runner, backends in SCENARIOS:
        if only and key not in only:
            continue
        for name in backends:
            if backend is not None and name != backend:
                continue
            t0 = time.perf_counter()
            print(f"running {', '.join(names)} on {name} ...", file=sys.stderr, flush=True)
            scenario = anyio.run(runner, settings, name, backend=name)
            print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            rows.extend(row.to_json() for row in scenario.rows)
            if scenario.details:
                details[f"{' + '.join(names)} [{name}]"] = scenario.details
            notes.extend(note for note in scenario.notes if note not in notes)
    assert_no_global_sdk()
    return {
        "suite": "pipekit benchmarks (python -m benchmarks)",
        "machine": describe_machine(),
        "settings": attrs.asdict(settings),
        "duration_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "legend": legend(rows, BASELINES),
        "notes": notes,
        "details": details,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.readme:
        path = args.output or RESULTS
        update_readme(json.loads(path.read_text()))
        print(f"regenerated the results table in benchmarks/README.md from {path}")
        return 0
    configure_logging()
    settings = SMOKE if args.smoke else FULL
    if args.rounds is not None:
        settings = attrs.evolve(settings, rounds=args.rounds)
    data = run_suite(settings, args.only, args.backend)
    print(text_table(data["rows"]))
    print()
    for name, what in data["legend"].items():
        print(f"{name}: {what}")
    for note in data["notes"]:
        print(note)
    missed = misses(data["rows"])
    if settings.smoke:
        print("smoke run: tiny sizes and one round prove the scripts work; its figures and PASS/MISS mean nothing")
    print(f"{len(data['rows'])} rows, {len(missed)} targets missed, {data['duration_s']:.1f} s")
    output = args.output or (None if args.smoke else RESULTS)
    if output is not None:
        write_json(output, data)
        print(f"wrote {output}")
    return 1 if args.strict and missed else 0

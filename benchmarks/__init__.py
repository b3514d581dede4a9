"""pipekit's benchmark suite: every scenario against its baselines, in the same process and run.

Run it from the repository root with ``python -m benchmarks`` (``--smoke`` for a
seconds-long check that the scripts still work, ``--readme`` to regenerate the
results table in ``benchmarks/README.md`` from ``benchmarks/results/latest.json``).
"""

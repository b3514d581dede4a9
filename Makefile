# pipekit — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit docs docs-serve clean
.PHONY: bench bench-smoke

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pipekit needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[otlp,ci,cli,dev,docs]'
	@touch $(STAMP)

## demo: run the example pipelines: examples/demo.py (parallel stages, a retried stage, a failure with
## rollback); the CI example in Python (real commands linting, testing and building examples/ci/sample);
## then examples/ci/pipeline.yaml through the pipekit command, recorded in a SQLite run history, with
## runs/show/retry --from-failed/stats on it
demo: $(STAMP)
	$(BIN)/python examples/demo.py
	$(BIN)/python examples/ci/ci.py
	$(BIN)/python examples/ci/cli_demo.py

## test: lint, type-check (mypy --strict), run the tests on asyncio and trio, build the docs, smoke-run the benchmarks
test: lint typecheck unit docs bench-smoke

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pipekit.spec --check  # the shipped JSON Schema matches the model

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

## bench: the full benchmark suite (a few minutes): prints the table, writes benchmarks/results/latest.json
## and regenerates the results table in benchmarks/README.md from it
bench: $(STAMP)
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks --readme

## bench-smoke: every benchmark scenario at tiny sizes, one round (seconds); writes nothing
bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks --smoke

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache

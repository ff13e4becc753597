# `make test` and `make demo` set everything up on a fresh machine: .venv, pinned dependencies, the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast lint format typecheck clean lock demo bench

install: $(STAMP)

# Reinstall whenever the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,deepspeed,app,lmms-eval]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check vpit tests benchmarks data_cards
	$(BIN)/ruff format --check vpit tests benchmarks data_cards

format: install
	$(BIN)/ruff check --fix vpit tests benchmarks data_cards
	$(BIN)/ruff format vpit tests benchmarks data_cards

typecheck: install
	$(BIN)/mypy

# Lint and types first: a red tree fails in seconds, before the suite runs. The suite runs on every core (up to 4
# workers), each worker taking whole test files, so a module's fixtures are built once and a file's multi-process
# launches run one after another.
test: lint typecheck
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# The suite without the slow and multi-process tests, for the edit-run loop.
test-fast: install
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile -m "not slow and not multiprocess"

# The toy world end to end: backbones, bridge, VPiT, decoder, evaluation -> outputs/demo/ (about 15 min on 2 cores).
demo: install
	$(BIN)/python -m vpit.toy.demo --out outputs/demo

# Every benchmark, each printing a table and writing benchmarks/results/*.json (about 20 min on 2 cores).
bench: install
	$(BIN)/python -m benchmarks

# Regenerate the exact pins from the current environment (after changing pyproject.toml).
lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v "^vpit" | sort -f > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

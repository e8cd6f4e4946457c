# The two entry points of the README. Both create/reuse .venv and install everything first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bench demo test lint bench-selection

setup:
	@bash scripts/setup.sh

bench: setup
	$(BIN)/vtoken bench --out out/bench

demo: setup
	$(BIN)/vtoken methods
	$(BIN)/vtoken demo --keep 64 --out out/demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench-selection: setup
	$(BIN)/python benchmarks/selection.py

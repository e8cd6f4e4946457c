# The two entry points of the README (bench, test). Both create/reuse .venv and install everything first, at the
# exact versions of requirements/lock.txt.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bench demo docs test lint bench-selection bench-prefill bench-video lock test-latest test-transformers

setup:
	@bash scripts/setup.sh

bench: setup
	$(BIN)/vtoken bench --out out/bench

demo: setup
	$(BIN)/vtoken methods
	$(BIN)/vtoken demo --keep 64 --out out/demo

# the method cards of docs/methods.md (a test fails when they are stale)
docs: setup
	$(BIN)/vtoken methods --markdown > docs/methods.md

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# speed / memory scripts (benchmarks/README.md); `make bench` is the accuracy bench (vtoken bench)
bench-selection: setup
	$(BIN)/python benchmarks/selection.py

bench-prefill: setup
	$(BIN)/python benchmarks/prefill.py --scale llava --dtype bf16 --threads 1 --clock cpu

bench-video: setup
	$(BIN)/python benchmarks/video.py --scale both --lm-layers 6 --repeats 1 --warmup 1 --dtype fp32

# regenerate requirements/lock.txt (the newest versions pyproject.toml allows, torch pinned)
lock:
	@bash scripts/lock.sh

# the newest releases pyproject.toml allows, in .venv-latest: the model tests (run before every stop)
test-latest:
	@bash scripts/test_against.sh latest

# one transformers release, e.g. make test-transformers TRANSFORMERS=5.16.0 (the whole suite, in .venv-5.16.0)
test-transformers:
	@bash scripts/test_against.sh $(TRANSFORMERS) tests

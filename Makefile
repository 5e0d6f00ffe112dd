# Two commands on a fresh machine: `make quickstart` (set up, run the embedded default) and
# `make test` (set up, lint, run the test suite). Both create .venv if it is missing.
VENV ?= .venv
PYTHON ?= python3
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build by accident on a
# CPU-only machine; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# tested versions of every other dependency (see the file's header)
CONSTRAINTS ?= .ci/constraints.txt

.PHONY: setup quickstart test lint clean constraints

setup: $(VENV)/.installed

# torch with pip, then the rest with uv (pinned in the constraints): it resolves and downloads in parallel (about
# 70 s from a cold cache where pip took 2-4 minutes) and keeps the torch installed above. --compile-bytecode:
# where PYTHONDONTWRITEBYTECODE is set (as on the CI machines), modules installed without their .pyc are compiled
# again by every process that imports them, and the suite's Ray and torchrun tests then ran about twice as long
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# rewrite the constraints from what the venv holds now (after a deliberate upgrade that passed make test)
constraints: setup
	{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | grep -v -iE '^(torch|pip|setuptools|wheel)[=-]'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

quickstart: setup
	$(BIN)/dist-unlearn run configs/quickstart/unlearn.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# the suite in this process, or on TEST_WORKERS pytest-xdist processes (a test file per worker at a time,
# the long files first: tests/conftest.py). One by default: on the idle 2-core machine 2 workers took longer than
# one (25 min 43 s against 24 min 48 s, docs/benchmarks.md), and an earlier 2-worker run failed on a race.
TEST_WORKERS ?= 1
# the package's bytecode first: where PYTHONDONTWRITEBYTECODE is set, each of the suite's hundreds of processes
# (torchrun ranks, Ray workers, CLI runs) would otherwise compile the modules it imports again
test: lint
	$(BIN)/python -m compileall -q dist_unlearn launchers > /dev/null
	$(BIN)/pytest -q --durations=40 $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

clean:
	rm -rf runs .pytest_cache

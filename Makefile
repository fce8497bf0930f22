# `make run` and `make test` do all set-up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export OMP_WAIT_POLICY := PASSIVE  # 2 torch threads beside another busy process otherwise spin (measured 14x slower)
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: run test lint repro setup clean

setup: $(VENV)/.installed

# uv installs in about a third of pip's time (measured on a fresh 2-core machine: ~75 s against
# ~230 s, bytecode compiled both ways); it ignores pip's configuration, so .ci/uv_args.py passes
# pip's find-links, indexes and constraints on (the local CPU torch wheel). Plain pip if uv fails.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if args=$$($(BIN)/python .ci/uv_args.py $(BIN)/python) \
	  && $(BIN)/python -m pip install --quiet --disable-pip-version-check uv \
	  && $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode $$args -e ".[dev]"; then :; \
	else echo "make setup: uv failed, installing with pip" >&2; \
	  $(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"; fi
	touch $@

run: setup  ## the whole pipeline on the built-in zoo, results table at the end
	$(BIN)/mergeflow run

# PYTHONDONTWRITEBYTECODE is set on these machines: without the project's bytecode compiled
# beforehand, each of the suite's dozens of mergeflow/dvc-stage/worker processes compiles it
# again (~0.8 s each); compileall only rewrites what changed
test: setup  ## the test suite
	$(BIN)/python -m compileall -q -j 0 mergeflow tasks flows >/dev/null
	$(BIN)/python -m pytest -q

lint: setup  ## static checks (ruff check, ruff format, mypy), run by CI before the tests
	$(BIN)/ruff check mergeflow tasks flows tests bench
	$(BIN)/ruff format --check mergeflow tasks flows tests bench
	$(BIN)/mypy mergeflow tasks flows

repro: setup  ## the same stages through DVC
	$(BIN)/dvc repro

clean:
	rm -rf artifacts .mergeflow mlflow.db mlartifacts

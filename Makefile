# The two entry points a fresh machine needs; each installs what it needs itself.
export OMP_NUM_THREADS ?= 1
PY := .venv/bin/python

.PHONY: run test lint bench bootstrap

bootstrap:
	@bash scripts/bootstrap.sh dev

# The local mesh with embedded defaults plus one private recommendation, end to end.
run: bootstrap
	$(PY) -m cipherfeed.cli demo

# Lint, then the whole test suite against real servers on loopback.
test: lint
	$(PY) -m pytest

# ruff (lint and format) and mypy (config in pyproject.toml; the generated code typed by its .pyi).
lint: bootstrap
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench:
	@bash scripts/bootstrap.sh bench
	$(PY) -m bench.scoring $(BENCH_ARGS)

# The two entry points a fresh machine needs; each installs what it needs itself.
export OMP_NUM_THREADS ?= 1
PY := .venv/bin/python

.PHONY: run test lint bench bootstrap fuzz fuzz-rpc quality gateway-fuzz load images

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

# Load on the mesh as separate processes (issue 13): 100k items, 8 devices, 60 s, 1/2/3 shards
# (~12 min on 2 cores). LOAD_ARGS e.g. --seconds 10 --shards 1,2.
load: bootstrap
	$(PY) -m bench.load $(LOAD_ARGS)

# Recommendation quality on MovieLens-100k (baselines, cipherfeed plaintext and through the real
# mesh under encryption for every test user: ~1 h on a loaded 2-core VM; --resume keeps finished protocols). QUALITY_ARGS e.g. --encrypted-users 0.
quality: bootstrap
	$(PY) -m services.recommender.catalogues.movielens fetch
	$(PY) -m bench.quality $(QUALITY_ARGS)

# The long fuzz run: every coverage-guided target for FUZZ_SECONDS each (corpora kept in fuzz/corpus).
FUZZ_SECONDS ?= 300
fuzz: bootstrap
	$(PY) -m fuzz.campaign --seconds $(FUZZ_SECONDS)

# The protocol fuzzer at full size: FUZZ_RPC_EXAMPLES requests per RPC against live servers, each
# RPC's results in fuzz/results/rpc/ (a rerun resumes at the first RPC not complete; FUZZ_RPC_ARGS=--fresh).
FUZZ_RPC_EXAMPLES ?= 10000
fuzz-rpc: bootstrap
	nice -n 10 $(PY) -m fuzz.rpc_campaign --examples $(FUZZ_RPC_EXAMPLES) $(FUZZ_RPC_ARGS)

# schemathesis against the gateway's served OpenAPI document: GATEWAY_FUZZ_EXAMPLES per operation and mode.
GATEWAY_FUZZ_EXAMPLES ?= 30
gateway-fuzz: bootstrap
	CIPHERFEED_GATEWAY_FUZZ_EXAMPLES=$(GATEWAY_FUZZ_EXAMPLES) $(PY) -m pytest -s -q -p no:cacheprovider tests/test_gateway_schemathesis.py

# Container images with podman (slow; not part of `make test`): a CPython 3.10 base made with
# debootstrap, the one cipherfeed image on it, and one container started and health-checked.
images: bootstrap
	bash deploy/build-images.sh

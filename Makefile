# One command to set up and run the service, one to set up and run every test.
#   make run    - create .venv, install everything, build the CPU kernels, serve the bundled model on 127.0.0.1:8000
#   make test   - create .venv, install everything, lint, run the whole test suite
#   make bench  - load benchmark: batched vs threadpool engine, then batch vs concurrent, then 32 streams
#                 beside 64 embedding requests (writes bench/results/)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# pytest workers for make test: two fit a 2-core CI machine (servers start while the other worker computes)
TEST_WORKERS ?= 2

# Python keeps each module's compiled bytecode (__pycache__) the first time it imports it, so that every later
# process only loads it; installs skip byte-compiling (scripts/setup-venv.sh) on that account. An environment
# that sets PYTHONDONTWRITEBYTECODE (some container images do) turns that off, and then every process compiles
# torch, transformers, ... from source again: ~6 s of CPU per server start and ~13 s per pytest worker's
# collection on a 2-core machine. What make runs keeps the cache (in the virtual environment, shared by the
# clones of this machine, and in the clone's own __pycache__ folders; Python writes each file atomically).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup venv kernels run test lint bench clean

setup: venv kernels

# The virtual environment (scripts/setup-venv.sh): built once per machine and requirements.txt in
# ~/.cache/textgen/venvs and linked as .venv, so a fresh clone sets up in seconds; an existing real .venv
# directory is kept and updated in place. Seconds when nothing changed, so it runs on every setup.
venv:
	bash scripts/setup-venv.sh $(PYTHON) $(VENV)
	@command -v ab >/dev/null 2>&1 || bash scripts/install-ab.sh
	@command -v redis-server >/dev/null 2>&1 || bash scripts/install-redis.sh
	@command -v chromium >/dev/null 2>&1 || bash scripts/install-chromium.sh

# The fused CPU kernels (textgen/engine/core/fused.c) for this CPU and compiler, into the user's kernel folder
# (~/.cache/textgen/kernels). Run on every setup: it only loads an existing build (seconds), and rebuilds
# after a change of source, compiler or CPU. Without a C compiler it warns and the server runs PyTorch paths.
kernels: venv
	$(PY) -m textgen.engine.core.build

# No proxy flags: the app believes X-Forwarded-For only from TEXTGEN_TRUSTED_PROXIES (environment or .env).
run: setup
	$(VENV)/bin/uvicorn main:app --host $(HOST) --port $(PORT)

# mypy's cache lives in the user's cache folder (outside the clone, like the kernels): a fresh clone checks in
# ~1 s instead of ~45 s of CPU. mypy re-checks every module whose source (or a dependency's) changed, so the
# cache never hides an error.
MYPY_CACHE ?= $(HOME)/.cache/mypy/textgen

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy --cache-dir $(MYPY_CACHE) textgen models.py main.py

test: setup lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --record-module-costs=.cache/test-module-costs.json \
		--durations=30

bench: setup
	$(PY) -m bench.bench
	$(PY) -m bench.bench --batch
	$(PY) -m bench.embeddings

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

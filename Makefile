# One command per chore. `make demo` and `make test` install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-main test-fast install-fastvideo test-fastvideo lint typecheck check clean bench bench-memory bench-memory-fastvideo gpu-bundle gpu-smoke gpu-smoke-cpu chaos

# The FastVideo engine on CPU (issue 3): its own venv, torch 2.14.1 + fastvideo 0.2.1 --no-deps + ray 2.60.0 (~6.8 GB).
FV_VENV ?= .venv-fastvideo
FV_STAMP := $(FV_VENV)/.installed

$(FV_STAMP): pyproject.toml constraints-fastvideo.txt scripts/install-fastvideo.sh
	VENV=$(FV_VENV) bash scripts/install-fastvideo.sh
	touch $(FV_STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP) $(FV_STAMP)  ## both environments: .venv (torch 2.13.0 CPU) and .venv-fastvideo

demo: $(STAMP)  ## one real render through the real queue on the CPU, saved under out/
	$(VENV)/bin/renderfarm demo

test: $(STAMP) $(FV_STAMP)  ## the whole suite, in both environments side by side (scripts/test.sh)
	bash scripts/test.sh

test-main: $(STAMP)  ## real redis-server, S3 endpoint and celery workers (FastVideo tests skip here)
	$(PY) -m pytest

test-fast: $(STAMP)  ## unit tests only (no worker processes)
	$(PY) -m pytest tests/test_schemas.py tests/test_keys.py tests/test_settings.py tests/test_video.py tests/test_images.py

install-fastvideo: $(FV_STAMP)

test-fastvideo: $(FV_STAMP)  ## FastVideo engine tests: tiny-wan on CPU in real prefork workers
	$(FV_VENV)/bin/python -m pytest tests/test_fastvideo*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache

bench: $(STAMP)  ## throughput and overhead, side by side, and the HTTP gateway's (prints figures, writes docs/benchmarks.md)
	$(PY) -m bench.throughput
	$(PY) -m bench.gateway

bench-memory: $(STAMP)  ## worker memory over 300 renders (prints growth per render, writes docs/benchmarks.md)
	$(PY) -m bench.memory

bench-memory-fastvideo: $(FV_STAMP)  ## the same with ENGINE=fastvideo (its spawned worker's RSS included)
	$(FV_VENV)/bin/python -m bench.memory --engine fastvideo

DURATION ?= 900
SEED ?= 1
chaos: $(STAMP)  ## chaos soak (needs root): DURATION s of faults with checkpoints on, then off, SEED's schedule; prints a table (ARGS=--write-docs: docs/reliability.md)
	$(PY) -m bench.chaos --duration $(DURATION) --seed $(SEED) $(ARGS)

gpu-bundle: $(STAMP)  ## here, with network: what gpu-smoke needs on a GPU machine without it, in .gpu-bundle/ (< 64 MiB with the source)
	$(PY) -m bench.gpu_bundle

gpu-smoke:  ## on a GPU machine: install .gpu-bundle/ offline, then the smoke check (Wan2.1-1.3B shapes; a time limit per row; docs/gpu.md)
	bash scripts/gpu-smoke.sh $(ARGS)

gpu-smoke-cpu: $(FV_STAMP)  ## the same check on the CPU, on tiny shapes (CI runs it: tests/test_fastvideo_gpu_smoke.py)
	PYTHON=$(FV_VENV)/bin/python BUNDLE=none bash scripts/gpu-smoke.sh --device cpu $(ARGS)

# One command per chore. `make demo` and `make test` install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint typecheck check clean

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## one real render through the real queue on the CPU, saved under out/
	$(VENV)/bin/renderfarm demo

test: $(STAMP)  ## the whole suite: real redis-server, S3 endpoint and celery workers
	$(PY) -m pytest

test-fast: $(STAMP)  ## unit tests only (no worker processes)
	$(PY) -m pytest tests/test_schemas.py tests/test_keys.py tests/test_settings.py tests/test_video.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache

# One entry point for humans and CI. `make demo` and `make test` install everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: setup demo test lint typecheck unit infra-check bench clean

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(CHECKOV_STAMP): requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.txt
	touch $(CHECKOV_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

## Run defender_pull (and the round trip) through the function entry point against the local emulators.
## TARGET=defender-portal: the unified-portal world, request rows and the mirror rule instead of API-created mirrors.
demo: setup
	$(PY) -m scripts.demo $(if $(TARGET),--target $(TARGET))

## The whole test suite: lint, types, unit, end-to-end and infrastructure checks.
test: setup $(CHECKOV_STAMP) lint typecheck unit infra-check

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy sync function_app.py

unit:
	$(VENV)/bin/pytest -q

infra-check: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov -d infra --framework bicep --compact --quiet --config-file .checkov.yaml

## Benchmark: N incidents (default 10000) from the emulators; prints requests, CPU and memory figures.
bench: setup
	$(PY) -m bench.pull_bench --incidents $${N:-10000}

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .demo

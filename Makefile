# medtune: every target creates/reuses .venv at the repository root and installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-installed
RECIPE ?= recipes/aria.yaml
RUN ?= runs/aria

.PHONY: install test test-fast lint format demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first and pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,gguf,ui,docs]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: $(STAMP) lint
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/medtune run $(RECIPE)

clean:
	rm -rf runs site build .pytest_cache .ruff_cache

# Entry points. Every target but webchat and clean creates/refreshes the virtualenv from the project's
# own files first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast run smoke devhost bench lint format clean webchat

$(STAMP): requirements.txt requirements-local.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an unpinned resolve would pull the multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# The Web Chat bundle for the devhost's /chat page: npm, pinned by package-lock.json, into the
# ignored node_modules/ (never committed, never deployed).
WEBCHAT_STAMP := node_modules/.webchat-installed
$(WEBCHAT_STAMP): package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $(WEBCHAT_STAMP)

# Without npm the pipeline and the terminal chat still work; only the browser page waits for it.
webchat:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(WEBCHAT_STAMP); \
	else \
		echo "npm not found: skipping the Web Chat bundle (the terminal chat works; for the browser page at /chat, install Node.js and run 'make webchat')"; \
	fi

## make test: the whole test suite (what CI runs)
test: venv
	$(BIN)/python -m pytest

## make test-fast: skip the slow end-to-end tests
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

## make run: the whole pipeline locally (devhost + local backend, demo preset), then chat with the result
run: venv webchat
	$(BIN)/python -m cli run --preset demo

## make smoke: the same with the tiny model (about a minute)
smoke: venv webchat
	$(BIN)/python -m cli run --preset smoke

## make devhost: just the local Functions + Durable host on 127.0.0.1:7071
devhost: venv
	$(BIN)/python -m devhost

bench: venv
	$(BIN)/python -m bench.devhost

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .devhost .pytest_cache .ruff_cache

# latentcast — two commands on a fresh machine:
#   make serve   start the server with the built-in tiny model on ws://127.0.0.1:8765/v1/ws
#   make test    lint, type-check and run the whole test suite
# Each installs what it needs into .venv first (torch 2.13.0 before anything that needs it).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
ARGS   ?=

.PHONY: serve test lint typecheck bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, exactly this version: a CPU wheel where one is provided locally; any
	# looser spec would let pip pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/latentcast serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check protocol server clients tests bench
	$(BIN)/ruff format --check protocol server clients tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict protocol

test: lint typecheck
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_server.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

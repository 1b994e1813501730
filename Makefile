# batchgate: `make run` serves on http://127.0.0.1:8000 (`make run PORT=8080 SIMULATOR_PORT=8091` to move it),
# `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PORT ?= 8000
# The simulator (the default upstream) takes a free port instead when this one is taken.
SIMULATOR_PORT ?= 8001
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/batchgate dev --port $(PORT) --simulator-port $(SIMULATOR_PORT)

test: venv
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.api
	$(BIN)/python -m bench.ratelimit

clean:
	rm -rf $(VENV) data .pytest_cache *.egg-info

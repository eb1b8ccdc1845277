# The whole developer workflow: `make run`, `make test`, `make lint`.
# PYTHON: the interpreter the venv is made with. Unset, scripts/pick-python.sh takes the
# fastest Python 3.11+ here (an optimised build runs the gateway ~20 % faster).
PYTHON ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt services cluster cluster-stop clean

$(STAMP): pyproject.toml
	@py="$(PYTHON)"; [ -n "$$py" ] || py=$$(bash scripts/pick-python.sh) || exit 1; \
	$$py -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")' && \
	echo "$$py -m venv $(VENV)" && $$py -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fishchat-iot up

cluster: $(STAMP)
	@bash scripts/cluster.sh start

cluster-stop:
	@bash scripts/cluster.sh stop

services:
	@bash scripts/test-services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

# Two commands matter (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint validate clean

$(BIN)/nvc: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/nvc

install: $(BIN)/nvc

## Set everything up and run the demo: embedded PostgreSQL, sandboxes, demo practices, first sync, Dagster UI.
demo: install
	$(BIN)/nvc demo

## The whole test suite (what CI runs).
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	DAGSTER_HOME= $(BIN)/dagster definitions validate -w workspace.yaml
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .nvc

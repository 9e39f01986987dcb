# Everything a fresh machine needs is installed from here: `make test` builds its own venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

PACKAGES := libs/esper-core
TESTS := libs/esper-core/tests

.PHONY: dev test lint bench demo proto clean

$(STAMP): constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt $(foreach p,$(PACKAGES),-e "$(p)[dev]")
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check libs benchmarks examples
	$(BIN)/ruff format --check libs benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

demo: $(STAMP)
	$(BIN)/python examples/grow_spirals.py

# The JSON Schemas under proto/ are generated from esper.contracts; commit what this writes.
proto: $(STAMP)
	$(BIN)/python -m esper.contracts.proto --out proto

clean:
	rm -rf $(VENV)

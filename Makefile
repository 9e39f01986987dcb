# Everything a fresh machine needs is installed from here: `make test` builds its own venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

SERVICES := urza tolaria
PACKAGES := libs/esper-core $(foreach s,$(SERVICES),services/$(s))
TESTS := libs/esper-core/tests $(foreach s,$(SERVICES),services/$(s)/tests)
LINTED := libs services benchmarks examples

.PHONY: dev test lint bench demo proto clean

$(STAMP): constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e "libs/esper-core[dev]" $(foreach s,$(SERVICES),-e services/$(s))
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
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

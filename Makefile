# Everything a fresh machine needs is installed from here: `make test` builds its own venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

SERVICES := urza tolaria tamiyo nissa
PACKAGES := libs/esper-core $(foreach s,$(SERVICES),services/$(s))
TESTS := libs/esper-core/tests $(foreach s,$(SERVICES),services/$(s)/tests) tests/integration \
	tests/e2e/test_compose_file.py tests/contract tests/faults tests/deploy
LINTED := libs services benchmarks examples

.PHONY: dev test test-tools e2e env lint bench bench-adapt up demo proto clean

$(STAMP): constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e "libs/esper-core[dev]" $(foreach s,$(SERVICES),-e services/$(s)) \
		-e "services/tolaria[ray]"
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP) test-tools
	$(BIN)/python -m pytest $(TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

# promtool and chromium for Nissa's config and report tests (Debian packages; skipped without apt).
test-tools:
	@bash deploy/install-test-tools.sh

# The compose stack end to end (starts a Docker engine with ../shared/tools/docker-sandbox if none).
e2e: $(STAMP)
	bash deploy/docker/e2e.sh $(PYTEST_ARGS)

# .env for docker-compose.yml: .env.example with fresh random tokens and signing key, which the
# compose stack requires. An existing .env is left alone (delete it for new secrets).
env:
	$(PYTHON) deploy/docker/make_env.py

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Does growth pay? Five tasks × 3 seeds × five arms through the local stack (≈ 5–15 min on 2 cores);
# writes docs/adaptation.md and docs/adaptation/. BENCH_ARGS=--quick: one task, one seed.
bench-adapt: $(STAMP)
	$(BIN)/python benchmarks/adaptation/run.py $(BENCH_ARGS)

# The main job: the local stack, then the growth demo job beside the same job without growth.
demo: $(STAMP)
	$(BIN)/esper demo

# The local stack (Redis + the four services) in the foreground; Ctrl-C stops it.
up: $(STAMP)
	$(BIN)/esper up

# The JSON Schemas under proto/ are generated from esper.contracts; commit what this writes.
proto: $(STAMP)
	$(BIN)/python -m esper.contracts.proto --out proto

clean:
	rm -rf $(VENV)

# dualdeploy: the README's commands. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQS := requirements.txt requirements-dev.txt serving/requirements.txt
SPEC ?= models/demo.yaml
DIST ?= dist

.PHONY: help setup build test lint bench clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install the pinned dependencies (safe to re-run).

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

build: setup ## Build the demo model's signed bundle into dist/ (SPEC=models/x.yaml for another).
	$(PY) -m model_build build $(SPEC) --out $(DIST)

test: setup ## Run the whole test suite.
	$(PY) -m pytest

lint: setup ## ruff, mypy (and ansible-lint once ansible/ has roles).
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy model_build serving components tests bench

bench: setup ## Run every benchmark in bench/; each prints a table and writes bench/results/<name>.json.
	for b in bench/*_bench.py; do echo "== $$b"; $(PY) $$b; done

clean: ## Remove build outputs (keeps .venv and the dev signing key).
	rm -rf $(DIST) build .cache

# --- edge (ansible/README.md) ------------------------------------------------------------------
EDGE_INVENTORY ?= ansible/inventories/local
.PHONY: edge edge-stop

edge: build ## Roll the demo bundle out to this machine as an edge device; a re-run changes nothing.
	$(PY) -m components.edge_rollout up --inventory $(EDGE_INVENTORY) --bundle $(DIST)/demo/latest --smoke
	@echo "Stop it with: make edge-stop"

edge-stop: setup ## Stop the service that `make edge` started (releases and venv stay).
	$(PY) -m components.edge_rollout stop --inventory $(EDGE_INVENTORY)

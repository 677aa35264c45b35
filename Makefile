# flux-impressionism: `make repro` rebuilds the pipeline, `make test` runs the tests.
# Both create .venv and install what they need on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1

.PHONY: install install-app install-test lock repro test test-fast params clean-outputs exps

# Three environments, each a superset of the one before, all pinned by one lock file
# (requirements.lock, compiled by pip-tools from the three requirements*.txt: `make lock`):
#   run  = requirements.txt                       (the pipeline, sweep, mlflow-ui, publish)
#   app  = run + requirements-gradio.txt          (make demo)
#   test = app + requirements-test.txt            (make test)
# The venv is created once; a target installs only what its environment lacks, and `pip check`
# must pass after every install.
INSTALL = $(PIP) install -q -c requirements.lock

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, at the lock's pin (torch==2.13.0, no local label): pip's own index and config decide
	# the build. PyPI alone gives its CUDA build (a GPU box); a machine whose pip config lists a CPU wheel
	# folder or index (this workplace, or PIP_EXTRA_INDEX_URL as README says) gets torch 2.13.0+cpu, which the
	# same `==2.13.0` pin matches. Nothing later changes it: every install is constrained by the lock.
	$(PIP) install -q -c requirements.lock torch

$(VENV)/.installed: requirements.txt requirements.lock | $(PY)
	$(INSTALL) -r requirements.txt
	$(PIP) check
	touch $@

$(VENV)/.app-installed: requirements-gradio.txt $(VENV)/.installed
	$(INSTALL) -r requirements.txt -r requirements-gradio.txt
	$(PIP) check
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.app-installed
	$(INSTALL) -r requirements.txt -r requirements-gradio.txt -r requirements-test.txt
	$(PIP) check
	touch $@

install: $(VENV)/.installed
install-app: $(VENV)/.app-installed
install-test: $(VENV)/.test-installed

PIPTOOLS ?= .cache/pip-tools
# The lock is compiled against PyPI alone (pip's config, find-links, extra indexes and constraints of this
# machine ignored), so it names no local build (`torch==2.13.0`, never `+cpu`) and resolves for every user.
# fast-deps reads each wheel's metadata with HTTP range requests instead of downloading ~3 GB of torch/CUDA.
PYPI_ONLY = env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null
lock:                    ## recompile requirements.lock from requirements*.txt against PyPI alone (pip-tools, in its own venv under .cache/)
	test -x $(PIPTOOLS)/bin/pip-compile || { python3 -m venv $(PIPTOOLS) && $(PYPI_ONLY) $(PIPTOOLS)/bin/pip install -q pip-tools==7.6.2; }
	$(PYPI_ONLY) $(PIPTOOLS)/bin/pip-compile -q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --pip-args "--use-feature=fast-deps" -o requirements.lock requirements.txt requirements-gradio.txt requirements-test.txt
	! grep -nE '^[^#]*==[^ ]*\+' requirements.lock   # a local version label (+cpu, +cu..) exists on one machine only

repro: install           ## run the whole pipeline (embedded smoke profile by default)
	dvc repro

test: install-test       ## the whole test suite, slow tests included
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: install-test  ## skip tests marked slow
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

params: install          ## regenerate conf/config.yaml from the schema and params.yaml from conf/
	$(PY) -m stages.core.params --sync

publish: install         ## assemble models/hub (adapter, samples, metrics, model card); PUSH=1 uploads it; ADAPTER=best ships the operating point's step
	$(PY) -m stages.publish $(if $(PUSH),--push) $(if $(REPO),--repo-id $(REPO)) $(if $(ADAPTER),--adapter $(ADAPTER))

demo: install-app        ## the Gradio app on the smoke profile's tiny model + models/lora (after `make repro`)
	@test -f models/lora/pytorch_lora_weights.safetensors || { echo "no adapter in models/lora: run 'make repro' first"; exit 1; }
	GRADIO_ANALYTICS_ENABLED=False $(PY) app/app.py --base tiny-random --adapter models/lora --host 127.0.0.1 --port $(or $(PORT),7860)
.PHONY: publish demo

MLFLOW_PORT ?= 5000
SWEEP_PARAM ?= lora.rank
SWEEP_VALUES ?= 8,16,32
SWEEP_JOBS ?= 1
mlflow-ui: install       ## browse the MLflow runs at http://127.0.0.1:$(MLFLOW_PORT) (the repo's mlflow.db; a team server has its own UI)
	@echo "runs table: $$($(PY) -c 'from stages.core import tracking; print(tracking.runs_url("http://127.0.0.1:$(MLFLOW_PORT)"))')"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

sweep: install           ## queue SWEEP_PARAM=SWEEP_VALUES as experiments, run them (SWEEP_JOBS workers), summarise into reports/sweep/
	dvc exp run --queue -S '$(SWEEP_PARAM)=$(SWEEP_VALUES)'
	dvc queue start -j $(SWEEP_JOBS)
	@# the queue every 30 s while it runs (Queued/Running/Success/Failed counts), then the table
	@while q=$$(dvc queue status 2>&1); grep -qE '\b(Queued|Running)\b' <<< "$$q"; do \
	  echo "$$(date +%T) queue: $$(grep -oE '\b(Queued|Running|Success|Failed)\b' <<< "$$q" | sort | uniq -c | xargs)"; sleep 30; done
	dvc queue status
	$(PY) -m stages.sweep --param $(SWEEP_PARAM)

plots-template:          ## rebuild plots/offline.html (vega, vega-lite, vega-embed from npm, inlined) for offline `dvc plots`
	python3 plots/vendor.py

exps: install            ## the experiment table: changed params + headline metrics, <= 15 columns, fits 150
	$(PY) -m stages.experiments

mutation: install-test   ## mutation gate (mutmut) on the correctness modules, fast tests per module; MODULES="stages/core/io.py ..." for a subset; writes reports/bench/mutation.md (not part of make test)
	HF_HUB_OFFLINE=1 $(PY) -m tests.mutation $(if $(MODULES),--modules $(MODULES))
.PHONY: mutation
.PHONY: mlflow-ui sweep plots-template

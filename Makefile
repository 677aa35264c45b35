# flux-impressionism: `make repro` rebuilds the pipeline, `make test` runs the tests.
# Both create .venv and install what they need on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1

.PHONY: install install-test repro test test-fast params clean-outputs

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the pinned CPU wheel: nothing later may pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt requirements-gradio.txt $(VENV)/.installed
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-gradio.txt  # why --no-deps: see the file
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.test-installed

repro: install           ## run the whole pipeline (embedded smoke profile by default)
	dvc repro

test: install-test       ## the whole test suite, slow tests included
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: install-test  ## skip tests marked slow
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

params: install          ## regenerate conf/config.yaml from the schema and params.yaml from conf/
	$(PY) -m stages.core.params --sync

publish: install         ## assemble models/hub (adapter, samples, metrics, model card); PUSH=1 uploads it
	$(PY) -m stages.publish $(if $(PUSH),--push) $(if $(REPO),--repo-id $(REPO))

demo: install-test       ## the Gradio app on the smoke profile's tiny model + models/lora (after `make repro`)
	@test -f models/lora/pytorch_lora_weights.safetensors || { echo "no adapter in models/lora: run 'make repro' first"; exit 1; }
	GRADIO_ANALYTICS_ENABLED=False $(PY) app/app.py --base tiny-random --adapter models/lora --host 127.0.0.1 --port $(or $(PORT),7860)
.PHONY: publish demo

MLFLOW_PORT ?= 5000
SWEEP_PARAM ?= lora.rank
SWEEP_VALUES ?= 8,16,32
SWEEP_JOBS ?= 1
mlflow-ui: install       ## browse the MLflow runs at http://127.0.0.1:$(MLFLOW_PORT) (the repo's mlflow.db; a team server has its own UI)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

sweep: install           ## queue SWEEP_PARAM=SWEEP_VALUES as experiments, run them (SWEEP_JOBS workers), summarise into reports/sweep/
	dvc exp run --queue -S '$(SWEEP_PARAM)=$(SWEEP_VALUES)'
	dvc queue start -j $(SWEEP_JOBS)
	while dvc queue status | grep -qE '\b(Queued|Running)\b'; do sleep 10; done
	dvc queue status
	$(PY) -m stages.sweep --param $(SWEEP_PARAM)
.PHONY: mlflow-ui sweep

# Entry points for users and CI. Every target creates or refreshes .venv/ only when pyproject.toml changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's bin/ first on PATH: dvc.yaml runs `python`, and `dvc queue` workers run `dvc` from PATH.
export PATH := $(BIN):$(PATH)

# The MLflow UI: loopback only unless UI_HOST says otherwise (it has no authentication).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
STORE ?= sqlite:///$(CURDIR)/mlflow.db
COMPARE := reports/compare

.PHONY: repro test lint venv clean-venv ui compare bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

lint: $(STAMP)
	ruff check .

test: lint
	pytest

ui: $(STAMP)
	mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-$(STORE)}" --host $(UI_HOST) --port $(UI_PORT)

compare: $(STAMP)
	python -m cvae_pipeline.comparison --out $(COMPARE)

# Minutes: see benchmarks/run.py. BENCH_FLAGS=--quick skips time to quality and the full IWAE.
bench: $(STAMP)
	python benchmarks/run.py $(BENCH_FLAGS)

clean-venv:
	rm -rf $(VENV)

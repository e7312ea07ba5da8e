# Entry points for users and CI. Every target creates or refreshes .venv/ only when pyproject.toml changed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# The venv's bin/ first on PATH: dvc.yaml runs `python`, and `dvc queue` workers run `dvc` from PATH.
export PATH := $(BIN):$(PATH)

# The MLflow UI: loopback only unless UI_HOST says otherwise (it has no authentication).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
STORE ?= sqlite:///$(CURDIR)/mlflow.db
# A team's tracking server: a SQL backend store and artifacts served by the server itself (clients need no access to
# the artifact storage). Point SERVER_STORE at PostgreSQL and SERVER_ARTIFACTS at object storage in production.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
# Host names clients may reach it by, beyond MLflow's default of localhost and private addresses (e.g. mlflow.internal).
SERVER_ALLOWED_HOSTS ?=
COMPARE := reports/compare
# make sweep: the params to sweep, as `dvc exp run -S` takes them, separated by spaces; J workers (no more than cores).
S ?=
J ?= 2
SWEEP_LOG := .dvc/tmp/sweep.log

.PHONY: repro test lint venv clean-venv ui mlflow-server compare sweep bench

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

mlflow-server: $(STAMP)
	mlflow server --backend-store-uri "$(SERVER_STORE)" --artifacts-destination "$(SERVER_ARTIFACTS)" \
		--serve-artifacts --host $(SERVER_HOST) --port $(SERVER_PORT) \
		$(if $(SERVER_ALLOWED_HOSTS),--allowed-hosts "$(SERVER_ALLOWED_HOSTS)")

compare: $(STAMP)
	python -m cvae_pipeline.comparison --out $(COMPARE)

# A whole sweep: prepare once (workers that each prepared would write the same outputs into DVC's cache at once),
# queue one experiment per combination, run them on J workers and wait, then compare. Fails if any experiment failed.
sweep: $(STAMP)
	@test -n "$(S)" || { echo "make sweep: S names what to sweep, e.g. make sweep S='model.latent_dim=2,10,50' J=2" >&2; exit 2; }
	dvc repro prepare
	dvc exp run --queue $(foreach s,$(S),-S '$(s)')
	dvc exp run --run-all -j $(J) 2>&1 | tee $(SWEEP_LOG)
	@! grep "Failed to reproduce" $(SWEEP_LOG) || { echo "make sweep: see why with dvc queue logs <name>" >&2; exit 1; }
	$(MAKE) --no-print-directory compare

# Minutes: see benchmarks/run.py. BENCH_FLAGS=--quick skips time to quality and the full IWAE.
bench: $(STAMP)
	python benchmarks/run.py $(BENCH_FLAGS)

clean-venv:
	rm -rf $(VENV)

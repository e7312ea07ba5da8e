# Entry points for users and CI. Every target creates or refreshes .venv/ only when pyproject.toml changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's bin/ first on PATH: dvc.yaml runs `python`, and `dvc queue` workers run `dvc` from PATH.
export PATH := $(BIN):$(PATH)

.PHONY: repro test lint venv clean-venv

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

clean-venv:
	rm -rf $(VENV)

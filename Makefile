# The project's entry points, for users and CI. `make help` (or plain `make`) lists the targets and the variables each
# takes; docs/make.md says what each does, the variables' defaults, and why.
.PHONY: help repro test unit smoke lint ui mlflow-server compare sweep tune tune-apply tune-dashboard promote sample bench
.PHONY: tutorial venv lock
.PHONY: clean-venv

# The list is the `## ` comments of the rules below (a trailing [...] names the variables), so it cannot drift.
help: ## this list (the default target)
	@awk '/^[a-z][a-z-]*:.*## / { n++; name[n] = substr($$0, 1, index($$0, ":") - 1); \
		desc[n] = substr($$0, index($$0, "## ") + 3); vars[n] = ""; \
		if (match(desc[n], / \[[^]]*\]$$/)) { vars[n] = substr(desc[n], RSTART + 2, RLENGTH - 3); \
			desc[n] = substr(desc[n], 1, RSTART - 1) } \
		if (length(name[n]) > w) w = length(name[n]); if (length(desc[n]) > d) d = length(desc[n]) } \
	END { print "make TARGET [VARIABLE=value ...]; what each does, the defaults and why: docs/make.md\n"; \
		name[0] = "target"; desc[0] = "what it does"; vars[0] = "variables"; \
		for (i = 0; i <= n; i++) { line = sprintf("  %-" w "s  %-" d "s  %s", name[i], desc[i], vars[i]); \
			sub(/ +$$/, "", line); print line } }' $(MAKEFILE_LIST)

# What every target shares: bash, the interpreter, the environment .venv/ and uv (docs/make.md#the-environment).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.11 python3.12 python3.13 python3; do $$p -c 'import sys; print(sys.executable)' \
	2>/dev/null && break; done)
endif
CHECK_PYTHON = @test -n "$(PYTHON)" || { echo "make: none of python3.11, 3.12, 3.13, python3 runs here; set PYTHON=" >&2; exit 2; }
VENV := .venv
BIN := $(abspath $(VENV))/bin
UV ?= $(or $(shell command -v uv),$(CURDIR)/.tools/bin/uv)
# EXTRAS=gpu (TensorFlow with its CUDA libraries) where `nvidia-smi -L` lists a GPU; EXTRAS= installs the CPU build.
ifeq ($(origin EXTRAS),undefined)
EXTRAS := $(if $(shell nvidia-smi -L 2>/dev/null | grep GPU),gpu)
endif
STAMP := $(VENV)/.installed$(subst $() ,,$(addprefix -,$(EXTRAS)))
# The venv's bin/ first on PATH: dvc.yaml runs `python`, and `dvc queue` workers run `dvc` from PATH.
export PATH := $(BIN):$(PATH)

repro: $(STAMP) ## the DVC pipeline: prepare, train, evaluate, visualize
	dvc repro

# make test / unit / smoke: pytest-xdist workers, one per core; 0 runs the tests in pytest's own process.
TEST_WORKERS ?= auto

# A file's tests stay on one worker (--dist loadfile), which builds the fixtures they share once.
test: lint ## ruff check, then every test: what CI runs [TEST_WORKERS]
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

unit: $(STAMP) ## the unit tests but those that train a model [TEST_WORKERS]
	pytest tests/unit -n $(TEST_WORKERS) -m "not (slow or training)"

smoke: $(STAMP) ## the fast tests and one small dvc repro [TEST_WORKERS]
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "smoke or not (slow or reliability or training)"

lint: $(STAMP) ## ruff check .
	ruff check .

# The MLflow UI: loopback only unless UI_HOST says otherwise (it has no authentication); one process per browser.
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
UI_WORKERS ?= 1
STORE ?= sqlite:///$(CURDIR)/mlflow.db
# MLflow's job runner (its GenAI jobs, which nothing here submits), for ui and mlflow-server: off unless true.
MLFLOW_JOBS ?= false
CHECK_JOBS = @case '$(MLFLOW_JOBS)' in true|false) ;; *) echo "make $@: MLFLOW_JOBS must be true or false, got \
	'$(MLFLOW_JOBS)'" >&2; exit 2;; esac

ui: $(STAMP) ## the MLflow UI of mlflow.db, on http://127.0.0.1:5000 [UI_HOST UI_PORT UI_WORKERS STORE MLFLOW_JOBS]
	$(CHECK_JOBS)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(MLFLOW_JOBS) mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-$(STORE)}" \
		--host $(UI_HOST) --port $(UI_PORT) --workers $(UI_WORKERS)

# A team's tracking server (docs/team.md). Secrets stay in the environment (PGPASSWORD, AWS_*,
# MLFLOW_AUTH_ADMIN_PASSWORD), never in these variables.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
SERVER_ALLOWED_HOSTS ?=
# auto: basic (MLflow's basic-auth app) unless it listens on loopback only; `none` beyond loopback is refused.
SERVER_AUTH ?= auto
SERVER_AUTH_STORE ?= sqlite:///$(CURDIR)/mlflow-server-auth.db
SERVER_PERMISSION ?= READ
# How long each server process trusts a password it verified (checking one is costly by design); 0 checks every request.
SERVER_AUTH_CACHE_S ?= 60
SERVER_WORKERS ?= 4

# Not echoed: a SERVER_STORE that holds a password by mistake is refused, not shown. The command says what it starts.
mlflow-server: $(STAMP) ## a team's tracking server, with users and passwords [SERVER_* MLFLOW_JOBS]
	$(CHECK_JOBS)
	@python -m cvae_pipeline.commands.tracking_server --host '$(SERVER_HOST)' --port '$(SERVER_PORT)' \
		--workers '$(SERVER_WORKERS)' --store '$(SERVER_STORE)' --artifacts '$(SERVER_ARTIFACTS)' \
		--allowed-hosts '$(SERVER_ALLOWED_HOSTS)' \
		--auth '$(SERVER_AUTH)' --auth-store '$(SERVER_AUTH_STORE)' --default-permission '$(SERVER_PERMISSION)' \
		--auth-cache-seconds '$(SERVER_AUTH_CACHE_S)' --jobs '$(MLFLOW_JOBS)' --state '$(CURDIR)/.mlflow-server'

COMPARE := reports/compare
compare: $(STAMP) ## the experiments by validation ELBO: reports/compare.md
	python -m cvae_pipeline.commands.compare --out $(COMPARE)

# S: the params to sweep, as `dvc exp run -S` takes them, separated by spaces; J workers (no more than cores).
S ?=
J ?= 2
SWEEP_LOG := .dvc/tmp/sweep.log
# A sweep of data.* params runs on one worker: each of its experiments prepares its own data.
SWEEP_JOBS = $(if $(filter data.%,$(S)),1,$(J))

# Prepares once: workers that each prepared would write the same outputs into DVC's cache at once.
sweep: $(STAMP) ## an experiment per combination of S on J workers; compare [S J]
	@test -n "$(S)" || { echo "make sweep: S names what to sweep, e.g. make sweep S='model.latent_dim=2,10,50' J=2" >&2; exit 2; }
	$(if $(filter-out $(J),$(SWEEP_JOBS)),@echo "make sweep: S varies data.* params and each experiment prepares its \
	own data: running them on 1 worker instead of $(J) (two preparing at once race in DVC's cache)" >&2)
	dvc repro prepare
	dvc exp run --queue $(foreach s,$(S),-S '$(s)')
	python -m cvae_pipeline.commands.sweep --jobs $(SWEEP_JOBS) --log $(SWEEP_LOG)
	$(MAKE) --no-print-directory compare

# A search over tune.yaml's space: TRIALS (default: tune.yaml's) on J workers here. With OPTUNA_STORAGE exported (a
# database URL, its password in PGPASSWORD), the same command on other machines joins the same study (docs/team.md).
TRIALS ?=
tune: $(STAMP) ## an Optuna search of tune.yaml: reports/tune.md [TRIALS J]
	dvc repro prepare
	python -m cvae_pipeline.commands.tune run $(if $(TRIALS),--trials '$(TRIALS)') --jobs '$(J)'

TRIAL ?=
tune-apply: $(STAMP) ## the study's best trial (or TRIAL) as a DVC experiment [TRIAL]
	python -m cvae_pipeline.commands.tune apply $(if $(TRIAL),--trial '$(TRIAL)')

# optuna-dashboard has no authentication: loopback only unless DASHBOARD_HOST says otherwise.
DASHBOARD_HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8080
tune-dashboard: $(STAMP) ## optuna-dashboard on http://127.0.0.1:8080 [DASHBOARD_HOST DASHBOARD_PORT]
	python -m cvae_pipeline.commands.tune dashboard --host '$(DASHBOARD_HOST)' --port '$(DASHBOARD_PORT)'

SWEEP ?=
promote: $(STAMP) ## the best run's model becomes <model_name>@champion [SWEEP]
	python -m cvae_pipeline.commands.promote $(if $(SWEEP),--sweep '$(SWEEP)')

# MODEL: a models:/ or runs:/ URI, or a .keras file; empty: the champion. MANIFOLD=20: a 2-D model's latent manifold.
MODEL ?=
N ?= 64
SEED ?= 0
OUT ?= reports/samples.png
MANIFOLD ?= 0
sample: $(STAMP) ## N samples from the prior of MODEL, as a PNG grid [MODEL N SEED OUT MANIFOLD]
	python -m cvae_pipeline.commands.sample $(if $(MODEL),'$(MODEL)') --count $(N) --seed $(SEED) --out '$(OUT)' --manifold $(MANIFOLD)

# BENCH_FLAGS=--quick: the wall clock alone; --precisions: the default against float32 and mixed_bfloat16 only.
BENCH_FLAGS ?=
bench: $(STAMP) ## time the project against the tutorial's loop [BENCH_FLAGS]
	python benchmarks/run.py $(BENCH_FLAGS)

# The tutorial's settings, one edition per variable (docs/make.md#tutorial); tests/test_tutorial.py checks them.
TUTORIAL_BOTH := train.learning_rate=1e-4 train.schedule=constant train.ema_momentum=0 train.kl=monte_carlo \
	train.precision=float32 data.validation_size=0
TUTORIAL_2020 := model.latent_dim=50 train.batch_size=100 train.epochs=100 $(TUTORIAL_BOTH)
TUTORIAL_current := model.latent_dim=2 train.batch_size=32 train.epochs=10 $(TUTORIAL_BOTH)
EDITION ?=
ifneq ($(filter tutorial,$(MAKECMDGOALS)),)
ifeq ($(strip $(TUTORIAL_$(EDITION))),)
$(error make tutorial: EDITION must be 2020 or current, got '$(EDITION)')
endif
endif
tutorial: $(STAMP) ## the TensorFlow tutorial's CVAE, as a DVC experiment [EDITION]
	dvc exp run -n tutorial-$(EDITION) $(foreach s,$(TUTORIAL_$(EDITION)),-S '$(s)')

# COMPILE_BYTECODE=no leaves compiling to the imports: less CPU for an environment that runs few processes (CI's).
COMPILE_BYTECODE ?= yes
venv: $(STAMP) ## make .venv/ match uv.lock; repro ... bench do it first [PYTHON VENV EXTRAS COMPILE_BYTECODE UV]
# --locked: a uv.lock that no longer matches pyproject.toml is an error (run `make lock`), never silently re-resolved.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(CHECK_PYTHON)
	rm -f $(VENV)/.installed*
	UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never $(UV) sync --locked --quiet --python $(PYTHON) \
		$(if $(filter yes,$(COMPILE_BYTECODE)),--compile-bytecode) --extra dev \
		$(foreach extra,$(EXTRAS),--extra $(extra))
	touch $@

# The uv that installs when none is on PATH: this version, which pip installs once into .tools/.
UV_VERSION := 0.13.9
$(CURDIR)/.tools/bin/uv:
	$(CHECK_PYTHON)
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv==$(UV_VERSION)

lock: | $(UV) ## resolve the dependencies into uv.lock (commit both) [UV]
	$(UV) lock

clean-venv: ## delete the environment and .tools/ [VENV]
	rm -rf $(VENV) .tools

# Entry points for users and CI. Every target first makes .venv/ match uv.lock (exact versions), in seconds; again
# only when pyproject.toml or uv.lock changed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# The interpreter of .venv/: the first that runs of python3.11 (what the full suite runs on in CI), 3.12, 3.13, python3.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.11 python3.12 python3.13 python3; do $$p -c 'import sys; print(sys.executable)' \
	2>/dev/null && break; done)
endif
CHECK_PYTHON = @test -n "$(PYTHON)" || { echo "make: none of python3.11, 3.12, 3.13, python3 runs here; set PYTHON=" >&2; exit 2; }
VENV := .venv
BIN := $(abspath $(VENV))/bin
# uv installs the lock file: the uv on PATH, else this version, which pip installs once into .tools/.
UV_VERSION := 0.13.9
UV ?= $(or $(shell command -v uv),$(CURDIR)/.tools/bin/uv)
# EXTRAS=gpu: TensorFlow with its CUDA libraries, for a machine with an NVIDIA GPU and only its driver; picked by
# default when `nvidia-smi -L` lists a GPU. EXTRAS= (empty) installs the CPU build there too.
ifeq ($(origin EXTRAS),undefined)
EXTRAS := $(if $(shell nvidia-smi -L 2>/dev/null | grep GPU),gpu)
endif
STAMP := $(VENV)/.installed$(subst $() ,,$(addprefix -,$(EXTRAS)))
# The venv's bin/ first on PATH: dvc.yaml runs `python`, and `dvc queue` workers run `dvc` from PATH.
export PATH := $(BIN):$(PATH)
# The MLflow UI: loopback only unless UI_HOST says otherwise (it has no authentication).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
# One person's browser needs one server process (MLflow's default, 4, loads MLflow four times over).
UI_WORKERS ?= 1
STORE ?= sqlite:///$(CURDIR)/mlflow.db
# A team's tracking server: a SQL backend store and artifacts served by the server itself (clients need no access to
# the artifact storage). Point SERVER_STORE at PostgreSQL and SERVER_ARTIFACTS at object storage in production
# (docs/team.md). Secrets stay in the environment, never in these variables: the database password in
# PGPASSWORD (or ~/.pgpass), the S3 keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials).
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
# Host names clients may reach it by, beyond MLflow's default of localhost and private addresses (e.g. mlflow.internal).
SERVER_ALLOWED_HOSTS ?=
# Who may use it: `basic` (MLflow's basic-auth app: users, passwords and permissions per experiment), `none`, or `auto`:
# basic unless it listens on loopback only. Beyond loopback `none` is refused. The admin's password comes from
# MLFLOW_AUTH_ADMIN_PASSWORD in the environment (first start only), never from these variables (docs/team.md).
SERVER_AUTH ?= auto
SERVER_AUTH_STORE ?= sqlite:///$(CURDIR)/mlflow-server-auth.db
# What a user may do with an experiment nobody granted them anything on: READ, EDIT, MANAGE or NO_PERMISSIONS.
SERVER_PERMISSION ?= READ
# How long each server process trusts a password it verified: checking one costs tens of milliseconds of CPU by design
# (scrypt), on every request a training makes. A password change or a deleted user reaches every process within it;
# 0 verifies every request.
SERVER_AUTH_CACHE_S ?= 60
# Server processes, each of which loads MLflow: MLflow's default, 4; fewer on a small machine.
SERVER_WORKERS ?= 4
# MLflow's job runner, for `make ui` and `make mlflow-server`: it runs MLflow's GenAI jobs (LLM judges, prompt
# optimization, trace archival), which nothing here submits, in eight more processes that each load MLflow and poll
# every minute. Off unless MLFLOW_JOBS=true (a server this team shares with GenAI work).
MLFLOW_JOBS ?= false
CHECK_JOBS = @case '$(MLFLOW_JOBS)' in true|false) ;; *) echo "make $@: MLFLOW_JOBS must be true or false, got \
	'$(MLFLOW_JOBS)'" >&2; exit 2;; esac
COMPARE := reports/compare
# make sweep: the params to sweep, as `dvc exp run -S` takes them, separated by spaces; J workers (no more than cores).
S ?=
J ?= 2
SWEEP_LOG := .dvc/tmp/sweep.log
# make promote: the best finished run's model becomes <registry.model_name>@champion; SWEEP= limits it to one sweep.
SWEEP ?=
# make sample: N samples from the prior of MODEL (a models:/ or runs:/ URI, or a .keras file; by default the champion,
# models:/<registry.model_name>@champion), seeded, as a PNG grid; MANIFOLD=20 also draws the latent manifold of a 2-D
# model.
MODEL ?=
N ?= 64
SEED ?= 0
OUT ?= reports/samples.png
MANIFOLD ?= 0
# make test / unit / smoke: pytest-xdist workers, one per core (more made the whole suite no faster on 2 cores:
# docs/testing.md).
TEST_WORKERS ?= auto

.PHONY: repro test unit smoke lint venv lock clean-venv ui mlflow-server compare sweep promote sample bench

venv: $(STAMP)

# --locked: a uv.lock that no longer matches pyproject.toml is an error (run `make lock`), never silently re-resolved.
# --compile-bytecode: every stage then imports TensorFlow about twice as fast (docs/setup.md), also where
# PYTHONDONTWRITEBYTECODE keeps Python from caching what it compiles. COMPILE_BYTECODE=no leaves it to the imports,
# which compile what they load, a third of it: less CPU time for an environment that runs few processes (CI's smoke
# runs, which let Python cache what it compiles).
COMPILE_BYTECODE ?= yes
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(CHECK_PYTHON)
	rm -f $(VENV)/.installed*
	UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never $(UV) sync --locked --quiet --python $(PYTHON) \
		$(if $(filter yes,$(COMPILE_BYTECODE)),--compile-bytecode) --extra dev \
		$(foreach extra,$(EXTRAS),--extra $(extra))
	touch $@

$(CURDIR)/.tools/bin/uv:
	$(CHECK_PYTHON)
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv==$(UV_VERSION)

# After editing the dependencies in pyproject.toml: resolve them again into uv.lock (commit both).
lock: | $(UV)
	$(UV) lock

repro: $(STAMP)
	dvc repro

lint: $(STAMP)
	ruff check .

# Everything CI runs: lint, then every test, one pytest-xdist worker per core. A file's tests stay on one worker,
# which builds the fixtures they share (a trained copy of the pipeline, a sweep) once.
test: lint
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The unit tests alone (tests/unit/), in parallel, but those that train a model: the quick loop while changing code.
unit: $(STAMP)
	pytest tests/unit -n $(TEST_WORKERS) -m "not (slow or training)"

# What CI runs on the other supported Pythons (make smoke PYTHON=python3.13 VENV=.venv-3.13): the fast tests and one
# small `dvc repro` end to end, in a few minutes.
smoke: $(STAMP)
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "smoke or not (slow or reliability or training)"

ui: $(STAMP)
	$(CHECK_JOBS)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(MLFLOW_JOBS) mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-$(STORE)}" \
		--host $(UI_HOST) --port $(UI_PORT) --workers $(UI_WORKERS)

# Not echoed: a SERVER_STORE that holds a password by mistake is refused, not shown. The command says what it starts.
mlflow-server: $(STAMP)
	$(CHECK_JOBS)
	@python -m cvae_pipeline.commands.tracking_server --host '$(SERVER_HOST)' --port '$(SERVER_PORT)' \
		--workers '$(SERVER_WORKERS)' --store '$(SERVER_STORE)' --artifacts '$(SERVER_ARTIFACTS)' \
		--allowed-hosts '$(SERVER_ALLOWED_HOSTS)' \
		--auth '$(SERVER_AUTH)' --auth-store '$(SERVER_AUTH_STORE)' --default-permission '$(SERVER_PERMISSION)' \
		--auth-cache-seconds '$(SERVER_AUTH_CACHE_S)' --jobs '$(MLFLOW_JOBS)' --state '$(CURDIR)/.mlflow-server'

compare: $(STAMP)
	python -m cvae_pipeline.commands.compare --out $(COMPARE)

# A whole sweep: prepare once (workers that each prepared would write the same outputs into DVC's cache at once),
# queue one experiment per combination, run them on J workers and wait, then compare. Fails if any experiment failed.
# A sweep of data.* params runs on one worker: each of its experiments prepares its own data.
SWEEP_JOBS = $(if $(filter data.%,$(S)),1,$(J))
sweep: $(STAMP)
	@test -n "$(S)" || { echo "make sweep: S names what to sweep, e.g. make sweep S='model.latent_dim=2,10,50' J=2" >&2; exit 2; }
	$(if $(filter-out $(J),$(SWEEP_JOBS)),@echo "make sweep: S varies data.* params and each experiment prepares its \
	own data: running them on 1 worker instead of $(J) (two preparing at once race in DVC's cache)" >&2)
	dvc repro prepare
	dvc exp run --queue $(foreach s,$(S),-S '$(s)')
	python -m cvae_pipeline.commands.sweep --jobs $(SWEEP_JOBS) --log $(SWEEP_LOG)
	$(MAKE) --no-print-directory compare

promote: $(STAMP)
	python -m cvae_pipeline.commands.promote $(if $(SWEEP),--sweep '$(SWEEP)')

sample: $(STAMP)
	python -m cvae_pipeline.commands.sample $(if $(MODEL),'$(MODEL)') --count $(N) --seed $(SEED) --out '$(OUT)' --manifold $(MANIFOLD)

# About 40 minutes: see benchmarks/run.py. BENCH_FLAGS=--quick (the wall clock alone: one stage repetition and time
# to quality, about 15 minutes) or --precisions (the default against float32 and mixed_bfloat16 only: a few minutes).
bench: $(STAMP)
	python benchmarks/run.py $(BENCH_FLAGS)

clean-venv:
	rm -rf $(VENV) .tools

# make tutorial EDITION=2020 or EDITION=current: the TensorFlow CVAE tutorial's edition as one DVC experiment
# (tutorial-2020, tutorial-current) with every setting it takes as an -S override, so `dvc exp show` lists them. Both
# editions: a constant Adam 1e-4, the weights themselves (no average), the one-sample Monte Carlo KL, float32, and all
# 60,000 training images with the test set scored after each epoch (no validation set); params.yaml's defaults are
# the tutorial's for the rest (filters, binarization at 0.5, beta 1, every image). train.steps_per_call keeps its
# default: it changes the speed, not the numbers. tests/test_tutorial.py checks them against the published settings.
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
.PHONY: tutorial
tutorial: $(STAMP) ## reproduce the TensorFlow tutorial's CVAE as a DVC experiment: EDITION=2020 or EDITION=current
	dvc exp run -n tutorial-$(EDITION) $(foreach s,$(TUTORIAL_$(EDITION)),-S '$(s)')

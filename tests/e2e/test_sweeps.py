"""Sweeps: `dvc exp run --queue` with 2 workers into the main repository's MLflow store; the UI; the comparison."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from cvae_pipeline.commands.compare import write_comparison
from helpers import REPO, free_port, run, subprocess_env, write_fake_mnist
from repositories import QUICK_EVALUATION, commit_all, make_repo_copy, queue_states, runs_in, setup_copy
from team_services import assert_serving_without_job_runner, server_process, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
# The whole sweep, and every test of it, this many times in a row: a race shows up as a flaky round. Once in
# `make test`; CVAE_SWEEP_ROUNDS=3 (or more) hunts a suspected race (docs/testing.md).
ROUNDS = int(os.environ.get("CVAE_SWEEP_ROUNDS", "1"))

SWEEP = "model.latent_dim=2,3 train.epochs=1,2 tracking.sweep=grid"  # 4 experiments
QUEUE_TIMEOUT_S = 900


@pytest.fixture(scope="module", params=range(1, ROUNDS + 1), ids=lambda n: f"round-{n}")
def sweep(tmp_path_factory):
    """A fresh copy, nothing prepared, in which `make sweep` ran a sweep of 4 experiments on 2 workers."""
    folder = tmp_path_factory.mktemp("sweep")
    repo = make_repo_copy(folder / "repo")
    env = setup_copy(repo, write_fake_mnist(folder), evaluate=QUICK_EVALUATION)
    baseline = commit_all(repo, "tiny")
    venv = Path(sys.prefix)  # this test's environment, in place of the copy's own .venv/
    made = subprocess.run(["make", "-o", f"{venv}/.installed", "sweep", f"VENV={venv}", "EXTRAS=", f"S={SWEEP}",
                           "J=2"], cwd=repo, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=QUEUE_TIMEOUT_S)
    names = run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    return {"repo": repo, "env": env, "baseline": baseline, "made": made, "states": queue_states(repo),
            "names": names}


def test_make_sweep_prepares_once_runs_every_experiment_and_compares(sweep):
    made = sweep["made"]
    assert made.returncode == 0, (made.stdout[-3000:], made.stderr[-3000:])
    assert sweep["states"] == ["Success"] * 4, run(["dvc", "queue", "status"], sweep["repo"]).stdout
    assert made.stdout.count("Running stage 'prepare'") == 1  # in the workspace; every experiment reused it
    compared = (sweep["repo"] / "reports/compare.md").read_text()
    assert all(name in compared for name in sweep["names"])


def test_make_sweep_without_params_says_what_to_give():
    made = subprocess.run(["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "EXTRAS=", "sweep"],
                          cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 2 and made.stderr.startswith("make sweep: S names what to sweep"), made.stderr


@pytest.mark.parametrize(("swept", "jobs"), [("model.latent_dim=2,10 data.threshold=0.4,0.6", "1"),
                                             ("model.latent_dim=2,10 train.epochs=2", "2")])
def test_make_sweep_runs_a_sweep_of_data_params_on_one_worker_saying_why(swept, jobs):
    # Each experiment of a data.* sweep prepares its own data; two workers preparing at once race in DVC's cache.
    made = subprocess.run(["make", "-n", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "EXTRAS=", "sweep",
                           f"S={swept}", "J=2"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert f"python -m cvae_pipeline.commands.sweep --jobs {jobs} " in made.stdout
    assert ("running them on 1 worker instead of 2" in made.stdout) == (jobs == "1")


def test_every_experiment_runs_and_lands_in_the_main_store_complete(sweep):
    repo = sweep["repo"]
    assert sweep["states"] == ["Success"] * 4, run(["dvc", "queue", "status"], repo).stdout
    assert len(sweep["names"]) == 4
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))  # no store inside the copies

    runs = runs_in(repo)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.mlflow.runName"]) == set(sweep["names"])
    assert set(runs["tags.dvc_experiment"]) == set(sweep["names"])
    assert set(runs["tags.dvc_baseline"]) == {sweep["baseline"]}
    assert set(runs["tags.sweep"]) == {"grid"}
    client = mlflow.MlflowClient()
    for _, found in runs.iterrows():
        epochs = int(found["params.train.epochs"])
        steps = [m.step for m in client.get_metric_history(found["run_id"], "validation_elbo")]
        assert steps == list(range(1, epochs + 1))
        for metric in ("eval_test_elbo", "eval_test_iwae", "eval_test_active_units", "final_validation_elbo"):
            assert pd.notna(found[f"metrics.{metric}"]), metric
        figures = {a.path for a in client.list_artifacts(found["run_id"], "figures")}
        assert "figures/training_progress.gif" in figures and len(figures) >= 5
        assert client.list_artifacts(found["run_id"]) != []  # and the model beside them


def test_no_worker_saw_a_locked_database(sweep):
    for name in sweep["names"]:
        logs = run(["dvc", "queue", "logs", name], sweep["repo"])
        assert "database is locked" not in logs.stdout + logs.stderr


def test_dvc_compares_experiments(sweep):
    repo, (first, second, *_) = sweep["repo"], sweep["names"]
    shown = run(["dvc", "exp", "show", "--json"], repo)
    assert shown.returncode == 0 and all(name in shown.stdout for name in sweep["names"])
    diff = run(["dvc", "exp", "diff", first, second, "--json"], repo)
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["params"]["params.yaml"]
    metrics = run(["dvc", "metrics", "diff", first, second, "--json"], repo)
    assert metrics.returncode == 0, metrics.stderr
    assert {"test.elbo", "validation.elbo"} <= set(json.loads(metrics.stdout)["reports/metrics.json"])
    plots = run(["dvc", "plots", "diff", first, second, "--json"], repo)
    assert plots.returncode == 0 and "validation_elbo" in plots.stdout, plots.stderr


def test_comparison_table_and_plot(sweep, monkeypatch):
    import dvc.api

    monkeypatch.chdir(sweep["repo"])
    table = write_comparison(dvc.api.exp_show(), sweep["repo"] / "reports/compare")
    experiments = table[table["experiment"].isin(sweep["names"])]
    assert len(experiments) == 4
    assert table["validation.elbo"].is_monotonic_decreasing  # best first, by the validation set
    assert {"model.latent_dim", "train.epochs", "validation.iwae", "validation.kl", "validation.active_units",
            "test.elbo", "test.iwae"} <= set(table.columns)
    assert len(pd.read_csv(sweep["repo"] / "reports/compare.csv")) == len(table)
    text = (sweep["repo"] / "reports/compare.md").read_text()
    header = text.splitlines()[2]
    assert "model.latent_dim" in header and "train.epochs" in header
    assert all(name in text for name in sweep["names"])
    assert "`train.batch_size=50`" in text and "`data.train_limit=null`" in text  # as params.yaml spells them
    assert (sweep["repo"] / "reports/compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ui(sweep):
    """`make ui` in the sweep's copy, on a free loopback port."""
    dry_run = subprocess.run(["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--host 127.0.0.1" in dry_run  # loopback by default, never 0.0.0.0
    assert "--workers 1" in dry_run
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = ["make", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", "EXTRAS=", "ui", f"UI_PORT={port}"]
    with server_process(command, cwd=sweep["repo"], env=subprocess_env()) as (server, log):
        wait_for_http(f"{base}/health", server, "make ui", log)
        assert_serving_without_job_runner(server)
        yield base


def api(base: str, path: str, payload: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if payload else "GET",
                                     data=json.dumps(payload).encode() if payload else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_ui_rest_api_finds_the_sweep_with_its_metrics(sweep, ui):
    experiment = api(ui, "experiments/get-by-name?experiment_name=cvae-mnist")["experiment"]
    found = api(ui, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                    "filter": "tags.sweep = 'grid'", "max_results": 50})["runs"]
    assert {r["info"]["run_name"] for r in found} == set(sweep["names"])
    for found_run in found:
        metrics = {m["key"] for m in found_run["data"]["metrics"]}
        assert {"eval_test_elbo", "eval_test_iwae", "validation_elbo", "train_loss"} <= metrics


def chromium() -> str:
    """Debian's headless Chromium (`.ci/install-test-servers` installs it); skips, which fails CI, when missing."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed: run .ci/install-test-servers (as root), or apt-get install chromium")
    return found


def test_ui_experiment_page_renders_the_run_names_in_headless_chromium(sweep, ui, tmp_path):
    experiment = api(ui, "experiments/get-by-name?experiment_name=cvae-mnist")["experiment"]
    page = f"{ui}/#/experiments/{experiment['experiment_id']}/runs"
    rendered = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=20000", "--dump-dom", page],
        capture_output=True, text=True, timeout=180,
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    missing = [name for name in sweep["names"] if name not in rendered.stdout]
    assert not missing, f"run names not rendered: {missing}"

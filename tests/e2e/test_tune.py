"""`make tune` for real, on the tiny pipeline: a study on two workers that prunes and survives a failing trial, its
report and its MLflow runs; a worker killed with -9 and the study carried on to its budget; Ctrl-C; the dashboard;
`make tune-apply` as a DVC experiment that `dvc exp apply` makes the default, params.yaml's comments kept."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from helpers import free_port, learnable_arrays, run, subprocess_env, write_fake_mnist
from repositories import QUICK_EVALUATION, commit_all, make_repo_copy, setup_copy
from team_services import server_process, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

VENV = Path(sys.prefix)  # this test's environment, in place of a copy's own .venv/
MAKE_IN_COPY = ["make", "-o", f"{VENV}/.installed", f"VENV={VENV}", "EXTRAS="]
TIMEOUT_S = 600
# Tiny trials: 8 short epochs of 20 steps at full learning rate from the first, so that a trial far below the others
# (one that learns nothing) is pruned before its end.
TINY_SEARCH = {"study": "tiny", "trials": 5, "sampler": {"name": "tpe", "seed": 0},
               "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 1},
               "fixed": {"train.epochs": 8, "train.batch_size": 10, "train.warmup_epochs": 0},
               "space": {"train.learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                         "train.ema_momentum": {"choices": [0, 0.99]}}}
# A comment of the user's own in params.yaml, which `dvc exp apply` must keep.
COMMENT = "# the team's notes on these params"


def tune_copy(folder: Path, **search) -> tuple[Path, dict]:
    """A fresh copy with the tiny pipeline and a tiny tune.yaml, committed; the environment of its commands."""
    repo = make_repo_copy(folder / "repo")
    env = setup_copy(repo, write_fake_mnist(folder, learnable_arrays()), evaluate=QUICK_EVALUATION)
    params = repo / "params.yaml"
    params.write_text(f"{COMMENT}\n{params.read_text()}")
    (repo / "tune.yaml").write_text(yaml.safe_dump({**TINY_SEARCH, **search}, sort_keys=False))
    commit_all(repo, "tiny")
    return repo, env


def study_in(repo: Path, name: str = "tiny") -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(repo / ".tune" / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def runs_of(repo: Path):
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cvae-mnist").experiment_id
    return client, client.search_runs([experiment], max_results=1000)


def processes_in(repo: Path) -> list[str]:
    """The command lines of the processes that run anything of this copy (trials, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(repo) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def make(repo: Path, env: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE_IN_COPY, *arguments], cwd=repo, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def start_make(repo: Path, env: dict, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen([*MAKE_IN_COPY, *arguments], cwd=repo, env=subprocess_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"make tune ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A copy in which `make tune TRIALS=5 J=2` ran, its first four trials queued by hand as a user may: one whose
    loss becomes NaN, the same fine one twice (equal to their median: never pruned), one far below them (pruned),
    then one that TPE samples."""
    repo, env = tune_copy(tmp_path_factory.mktemp("tune"))
    (repo / ".tune").mkdir()
    storage = JournalStorage(JournalFileBackend(str(repo / ".tune" / "optuna.journal")))
    queued = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for learning_rate in (1.0e6, 3.0e-3, 3.0e-3, 1.0e-7):
        queued.enqueue_trial({"train.learning_rate": learning_rate, "train.ema_momentum": 0},
                             skip_if_exists=False)
    made = make(repo, env, "tune", "TRIALS=5", "J=2")
    return {"repo": repo, "env": env, "made": made}


def test_make_tune_runs_the_budget_on_two_workers_prunes_and_goes_on_after_a_failure(study):
    made, repo = study["made"], study["repo"]
    assert made.returncode == 0, (made.stdout[-3000:], made.stderr[-3000:])
    trials = study_in(repo).get_trials(deepcopy=False)
    assert [trial.state for trial in trials[:4]] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE,
                                                     TrialState.PRUNED]
    assert trials[4].state in (TrialState.COMPLETE, TrialState.PRUNED) and len(trials) == 5
    pruned = 1 + (trials[4].state == TrialState.PRUNED)
    assert f"tune: 5 of 5 done: {pruned} pruned, 1 failed, 0 running, best " in made.stderr
    assert "training diverged" in trials[0].user_attrs["reason"]
    assert trials[3].user_attrs["reason"].startswith("pruned after epoch ")
    assert max(trials[3].intermediate_values) < 8 and sorted(trials[1].intermediate_values) == list(range(1, 9))
    assert trials[3].intermediate_values[1] < trials[1].intermediate_values[1] - 10  # far below: learns nothing
    assert not processes_in(repo)


def test_every_trial_is_isolated_from_the_workspace_and_from_the_others(study):
    repo = study["repo"]
    assert [path.name for path in (repo / "models").iterdir()] == [".gitignore"]  # no training in the workspace
    for number in [trial.number for trial in study_in(repo).trials if trial.state == TrialState.COMPLETE]:
        folder = repo / ".tune" / "trials" / "tiny" / f"trial-{number}"
        params = yaml.safe_load((folder / "params.yaml").read_text())
        assert params["train"]["epochs"] == 8 and params["model"]["latent_dim"] == 2  # fixed on the copy's params
        assert (folder / "cvae.keras").is_file() and (folder / "train_metrics.json").is_file()
    train_outputs = ["reports/train_metrics.json", "reports/train_history.csv", "reports/train_settings.json"]
    assert run(["git", "status", "--porcelain", "--", *train_outputs], repo).stdout == ""  # the committed ones


def test_the_report_ranks_the_trials_with_reasons_and_figures(study):
    repo = study["repo"]
    text = (repo / "reports" / "tune.md").read_text()
    pruned = 1 + (study_in(repo).trials[4].state == TrialState.PRUNED)
    assert f"Trials: 5 of 5: {4 - pruned} complete, {pruned} pruned, 1 failed" in text
    assert "- trial 0 failed: training diverged: loss is nan at epoch 1" in text
    assert "## Best" in text and "make tune-apply TRIAL=" in text
    for name in ("optimization_history", "param_importances", "parallel_coordinates", "learning_curves"):
        assert (repo / "reports" / "tune" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert (repo / "reports" / "tune" / "trials.csv").read_text().startswith("trial,state,validation_elbo,")


def test_each_trial_is_a_run_nested_under_the_studys_run_which_holds_the_report(study):
    client, runs = runs_of(study["repo"])
    (parent,) = [found for found in runs if found.data.tags.get("kind") == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == "tiny"
    assert {item.path for item in client.list_artifacts(parent.info.run_id, "tune")} >= {"tune/tune.md",
                                                                                         "tune/trials.csv"}
    assert "best_validation_elbo" in parent.data.metrics
    trials = {int(found.data.tags["trial"]): found for found in runs if found.data.tags.get("kind") != "study"}
    assert sorted(trials) == [0, 1, 2, 3, 4]
    expected = {"FAIL": ("FAILED", "failed"), "COMPLETE": ("FINISHED", "complete"), "PRUNED": ("KILLED", "pruned")}
    states = {trial.number: trial.state.name for trial in study_in(study["repo"]).trials}
    assert [states[number] for number in range(4)] == ["FAIL", "COMPLETE", "COMPLETE", "PRUNED"]
    for number, found in trials.items():
        assert found.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert found.data.tags["study"] == "tiny" and found.data.tags["machine"]
        assert found.info.run_name == f"tiny-trial-{number}"
        status, state = expected[states[number]]
        assert (found.info.status, found.data.tags["state"]) == (status, state), number
    assert "training diverged" in trials[0].data.tags["reason"]
    curve = client.get_metric_history(trials[1].info.run_id, "validation_elbo")
    assert [point.step for point in curve] == list(range(1, 9))  # the per-epoch curve the UI compares


def test_make_tune_dashboard_serves_the_study_on_loopback(study):
    port = free_port()
    command = [*MAKE_IN_COPY, "tune-dashboard", f"DASHBOARD_PORT={port}"]
    with server_process(command, cwd=study["repo"], env=subprocess_env(**study["env"])) as (process, log):
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", process, "make tune-dashboard", log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as answer:
            assert b"tiny" in answer.read()


def test_make_tune_apply_runs_the_best_trial_as_a_dvc_experiment_that_apply_makes_the_default(study):
    repo, env = study["repo"], study["env"]
    best = study_in(repo).best_trial
    applied = make(repo, env, "tune-apply")
    assert applied.returncode == 0, (applied.stdout[-3000:], applied.stderr[-3000:])
    assert f"tune-apply: dvc exp run -n tiny-trial-{best.number} -S train.learning_rate=" in applied.stderr
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout
    assert f"tiny-trial-{best.number}" in shown
    assert run(["dvc", "exp", "apply", f"tiny-trial-{best.number}"], repo).returncode == 0
    params = (repo / "params.yaml").read_text()
    assert params.startswith(COMMENT)  # the user's comment kept
    applied_params = yaml.safe_load(params)["train"]
    assert applied_params["learning_rate"] == pytest.approx(best.params["train.learning_rate"])
    assert applied_params["epochs"] == 2  # params.yaml's own budget, not tune.yaml's fixed 8


def test_a_worker_killed_with_minus_9_leaves_nothing_running_and_the_next_run_finishes_the_study(tmp_path):
    # Two objectives here: the Pareto front of quality against time, without pruning.
    repo, env = tune_copy(tmp_path, trials=3, objectives=["validation_elbo", "train_seconds"],
                          fixed={"train.epochs": 12})
    started = start_make(repo, env, "tune", "J=1")
    checkpoint = repo / ".tune" / "trials" / "tiny" / "trial-0" / "checkpoint.npz"
    try:
        wait_for(checkpoint.exists, "trial 0's first epoch", started)
        (worker,) = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                     and b"cvae_pipeline.commands.tune" in _cmdline(entry) and _group(entry) == started.pid]
        os.kill(worker, signal.SIGKILL)
        started.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes_in(repo) and time.monotonic() < deadline:  # the trial's stage dies with its worker
        time.sleep(0.2)
    assert not processes_in(repo)
    assert study_in(repo).trials[0].state == TrialState.RUNNING  # as the kill left it

    resumed = make(repo, env, "tune", "J=1")
    assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-3000:])
    assert f"trial 0 was left RUNNING by worker {worker}" in resumed.stderr
    trials = study_in(repo).get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and f"pid {worker}" in trials[0].user_attrs["reason"]
    assert trials[1].params == trials[0].params  # its params run again, first
    assert [trial.state for trial in trials[1:]] == [TrialState.COMPLETE] * 3  # the budget of 3, counted right
    _, runs = runs_of(repo)
    assert not [found.info.run_name for found in runs if found.info.status == "RUNNING"]
    killed = [found for found in runs if found.data.tags.get("trial") == "0"]
    assert [found.info.status for found in killed] == ["FAILED"] and "died" in killed[0].data.tags["reason"]
    text = (repo / "reports" / "tune.md").read_text()
    assert "## Pareto front (quality against training time)" in text and "pruning does not apply" in text
    assert "1 cut short by a dead worker or Ctrl-C" in text
    assert (repo / "reports" / "tune" / "pareto_front.png").is_file()


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def _group(entry: Path) -> int | None:
    try:
        return os.getpgid(int(entry.name))
    except OSError:
        return None


def test_ctrl_c_stops_every_worker_and_trial_cleanly(tmp_path):
    repo, env = tune_copy(tmp_path, trials=4, fixed={"train.epochs": 200})
    started = start_make(repo, env, "tune", "J=2")
    trials = repo / ".tune" / "trials" / "tiny"
    try:
        wait_for(lambda: all((trials / f"trial-{n}" / "checkpoint.npz").exists() for n in (0, 1)),
                 "both trials' first epoch", started)
        os.killpg(started.pid, signal.SIGINT)  # what a terminal sends its foreground job on Ctrl-C
        _, stderr = started.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)
    assert started.returncode != 0 and "tune: interrupted" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not processes_in(repo)
    stored = study_in(repo).get_trials(deepcopy=False)
    assert TrialState.RUNNING not in [trial.state for trial in stored]
    stopped = [trial for trial in stored if trial.state == TrialState.FAIL]
    assert len(stopped) == 2 and all("Ctrl-C" in trial.user_attrs["reason"] for trial in stopped)
    assert len([trial for trial in stored if trial.state == TrialState.WAITING]) == 2  # queued again
    _, runs = runs_of(repo)
    statuses = {found.data.tags.get("kind", "trial"): found.info.status for found in runs}
    assert not [found for found in runs if found.info.status == "RUNNING"]
    assert statuses["study"] == "KILLED" and statuses["trial"] == "KILLED"
    assert (repo / "reports" / "tune.md").is_file()

"""`make tune-apply`'s command: the chosen trial's varied params alone (never tune.yaml's `fixed`), as `dvc exp run -S`
takes them, named after the study and trial; and its one-line refusals. `make tune-dashboard` on loopback."""

import argparse
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cvae_pipeline.commands import tune
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.tuning.storage import STORAGE_ENV, open_storage
from helpers import REPO, subprocess_env

SEARCH = {"study": "s", "fixed": {"train.epochs": 2},
          "space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                    "train.ema_momentum": {"choices": [0, 0.99]}}}


@pytest.fixture
def study_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(SEARCH))
    return tmp_path


def add_trials(root, directions, results):
    study = optuna.create_study(study_name="s", storage=open_storage(root), directions=directions)
    for number, (state, values) in enumerate(results):
        study.add_trial(create_trial(
            state=state, values=values,
            params={"train.learning_rate": 0.001 * (number + 1), "train.ema_momentum": 0.99},
            distributions={"train.learning_rate": FloatDistribution(1e-3, 1e-2, log=True),
                           "train.ema_momentum": CategoricalDistribution([0, 0.99])}))


def arguments(trial=None):
    return argparse.Namespace(file="tune.yaml", params="params.yaml", trial=trial)


def test_apply_runs_the_best_trials_varied_params_at_params_yamls_budget(study_here):
    add_trials(study_here, ["maximize"], [(TrialState.COMPLETE, [-90.0]), (TrialState.COMPLETE, [-80.0]),
                                          (TrialState.PRUNED, None)])
    assert tune.apply_arguments(arguments()) == [
        "dvc", "exp", "run", "-n", "s-trial-1", "-S", "train.learning_rate=0.002", "-S", "train.ema_momentum=0.99"]
    assert tune.apply_arguments(arguments(0))[4] == "s-trial-0"
    with pytest.raises(UserInputError, match=r"TRIAL=2: not a complete trial of study 's' \(complete: 0, 1\)"):
        tune.apply_arguments(arguments(2))


def test_apply_asks_for_a_trial_of_the_pareto_front_with_two_objectives(study_here):
    add_trials(study_here, ["maximize", "minimize"], [(TrialState.COMPLETE, [-90.0, 10.0]),
                                                      (TrialState.COMPLETE, [-80.0, 20.0])])
    with pytest.raises(UserInputError, match=r"no single best: choose one of the Pareto front with TRIAL= \(0, 1"):
        tune.apply_arguments(arguments())
    assert tune.apply_arguments(arguments(1))[4] == "s-trial-1"


def test_apply_without_a_study_says_to_run_make_tune(study_here):
    with pytest.raises(UserInputError, match=r"no study 's' in \.tune/optuna\.journal; run make tune first"):
        tune.apply_arguments(arguments())


def test_values_reach_dvc_as_yaml():
    assert [tune.value_for_dvc(value) for value in (0.002, 100, True, None, "cosine")] == [
        "0.002", "100", "true", "null", "cosine"]


def test_the_dashboard_without_a_study_and_a_bad_budget_are_one_line_each(study_here):
    for command in (["dashboard"], ["run", "--trials", "0"]):
        done = subprocess.run([sys.executable, "-m", "cvae_pipeline.commands.tune", *command], cwd=study_here,
                              env=subprocess_env(), capture_output=True, text=True)
        assert done.returncode != 0 and len(done.stderr.splitlines()) == 1, done.stderr
        assert ("run make tune first" in done.stderr) if command == ["dashboard"] else done.stderr.startswith(
            "TRIALS=0: the budget must be a positive integer")


def test_make_tune_dashboard_serves_on_loopback_by_default():
    shown = subprocess.run(["make", "-n", "tune-dashboard"], cwd=REPO, capture_output=True, text=True)
    assert "dashboard --host '127.0.0.1' --port '8080'" in shown.stdout

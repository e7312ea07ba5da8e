"""Before a study's first trial: the data its trials train on (the workspace's, or prepared once for tune.yaml's fixed
data settings), a study whose objectives match tune.yaml's, and no more workers than cores."""

import os
import shutil

import mlflow
import optuna
import pytest
import yaml

from cvae_pipeline.data import load_prepared
from cvae_pipeline.errors import ParamsError, TrainingError
from cvae_pipeline.tuning.space import parse_search
from cvae_pipeline.tuning.storage import STORAGE_ENV
from cvae_pipeline.tuning.study import Progress, open_study, run_study, trial_data
from cvae_pipeline.tuning.trial import Outcome
from cvae_pipeline.tuning.workers import Workers
from helpers import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SPACE = {"train.learning_rate": {"low": 1e-3, "high": 1e-2}}


def search_of(**changes):
    return parse_search(yaml.safe_dump({"study": "s", "space": SPACE, **changes}), BASE)


@pytest.fixture
def root(tmp_path, fake_mnist, monkeypatch):
    mirror, manifest, _ = fake_mnist
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(manifest, repo / "data" / "mnist.json")
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    return repo


def test_trials_that_take_params_yamls_data_train_on_the_workspaces_prepared_file(root):
    with pytest.raises(ParamsError, match=r"data/prepared/mnist.npz: not found; run `dvc repro prepare` first"):
        trial_data(search_of(), BASE, root)
    (root / "data/prepared").mkdir()
    (root / "data/prepared/mnist.npz").write_bytes(b"prepared by the prepare stage")
    assert trial_data(search_of(fixed={"train.epochs": 2}), BASE, root) == root / "data/prepared/mnist.npz"


def test_fixed_data_settings_are_prepared_once_for_every_trial_outside_the_workspace(root):
    search = search_of(fixed={"data.validation_size": 100, "data.train_limit": 50})
    prepared = trial_data(search, BASE, root)
    assert prepared.parent == root / ".tune/data" and not (root / "data/prepared").exists()
    data = load_prepared(prepared)
    assert len(data.train.images) == 50 and len(data.validation.images) == 100
    written = prepared.stat().st_mtime_ns
    assert trial_data(search, BASE, root) == prepared and prepared.stat().st_mtime_ns == written  # once
    other = trial_data(search_of(fixed={"data.validation_size": 100, "data.train_limit": 60}), BASE, root)
    assert other != prepared


def test_a_study_is_resumed_only_with_the_objectives_it_was_made_with():
    storage = optuna.storages.InMemoryStorage()
    study, created = open_study(search_of(), storage)
    assert created and study.directions == [optuna.study.StudyDirection.MAXIMIZE]
    study, created = open_study(search_of(), storage)
    assert not created and study.study_name == "s"
    with pytest.raises(ParamsError, match="study 's' exists with other objectives; name a new study"):
        open_study(search_of(objectives=["validation_elbo", "train_seconds"]), storage)


@pytest.mark.parametrize("jobs", [0, (os.cpu_count() or 1) + 1])
def test_the_workers_number_one_to_the_cores(root, jobs):
    with pytest.raises(ParamsError, match=f"J={jobs}: the workers must number 1 to this machine's"):
        run_study(search_of(), BASE, root, 4, jobs)
    assert not (root / ".tune").exists()


def test_a_study_in_which_no_trial_completes_ends_in_error_with_the_reasons_reported(root, monkeypatch):
    monkeypatch.chdir(root)  # the MLflow store of this copy: its mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setattr(Workers, "_train", lambda self, trial, varied: Outcome("failed", reason="out of memory"))
    (root / "data/prepared").mkdir()
    (root / "data/prepared/mnist.npz").write_bytes(b"prepared")
    with pytest.raises(TrainingError, match=r"study s: no trial completed; reports/tune\.md gives each one's reason"):
        run_study(search_of(), BASE, root, 2, 1)
    assert "- trial 1 failed: out of memory" in (root / "reports/tune.md").read_text()
    mlflow.set_tracking_uri(None)


class Recorded:
    def __init__(self):
        self.logged = []

    def log_progress(self, finished, metrics):
        self.logged.append((finished, metrics))


def _complete(study, values, learning_rate):
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": learning_rate}, values=values,
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2)}))


def test_the_progress_line_names_the_best_trial_or_with_two_objectives_the_front_even_of_one():
    study, record = optuna.create_study(direction="maximize"), Recorded()
    _complete(study, [-90.0], 2e-3)
    _complete(study, [-85.0], 3e-3)
    assert Progress(study, search_of(), 4, record).update() == (
        "2 of 4 done: 0 pruned, 0 failed, 0 running, best -85.00 (trial 1)")
    assert record.logged == [(2, {"best_validation_elbo": -85.0})]

    study, record = optuna.create_study(directions=["maximize", "minimize"]), Recorded()
    _complete(study, [-85.0, 100.0], 2e-3)
    _complete(study, [-90.0, 200.0], 3e-3)  # worse and slower: trial 0 alone is the front
    line = Progress(study, search_of(objectives=["validation_elbo", "train_seconds"]), 4, record).update()
    assert line.endswith("1 on the Pareto front") and record.logged == []

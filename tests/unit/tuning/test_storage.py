"""Where a study lives (the journal file here, OPTUNA_STORAGE's database for several machines; never a password in the
URL, never SQLite), and the trials that a dead worker on this machine left RUNNING: failed, their params queued
again."""

import os
import subprocess

import optuna
import pytest
from optuna.storages.journal import JournalStorage
from optuna.trial import TrialState

from cvae_pipeline.errors import ParamsError
from cvae_pipeline.tracking.store import HOST
from cvae_pipeline.tuning.storage import (
    HOST_ATTR,
    JOURNAL,
    PID_ATTR,
    REASON_ATTR,
    STORAGE_ENV,
    fail_dead_trials,
    open_storage,
    shown_storage,
    storage_url,
)
from cvae_pipeline.tuning.workers import counted


def test_without_optuna_storage_a_study_lives_in_the_journal_file(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert storage_url() is None and shown_storage() == str(JOURNAL)
    storage = open_storage(tmp_path)
    assert isinstance(storage, JournalStorage)
    optuna.create_study(study_name="s", storage=storage)
    assert (tmp_path / JOURNAL).is_file()


@pytest.mark.parametrize("url", ["postgresql://optuna:hunter2@db/optuna", "postgresql://optuna@db/optuna?password=x"])
def test_a_password_in_the_storage_url_is_refused_without_showing_it(monkeypatch, url):
    monkeypatch.setenv(STORAGE_ENV, url)
    with pytest.raises(ParamsError) as raised:
        storage_url()
    assert "PGPASSWORD" in str(raised.value) and "hunter2" not in str(raised.value) and url not in str(raised.value)


def test_sqlite_is_refused_for_its_lock_under_parallel_workers(monkeypatch):
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///optuna.db")
    with pytest.raises(ParamsError, match="database is locked"):
        storage_url()


def test_an_unreachable_database_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(STORAGE_ENV, "postgresql://optuna@127.0.0.1:1/optuna?connect_timeout=2")
    with pytest.raises(ParamsError) as raised:
        open_storage(tmp_path)
    assert str(raised.value).startswith(f"{STORAGE_ENV}=postgresql://***@127.0.0.1:1/optuna")
    assert "cannot open the study's database" in str(raised.value)


def _running(study, pid, host=HOST, learning_rate=1e-3):
    trial = study.ask({"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study._storage.set_trial_param(trial._trial_id, "train.learning_rate", learning_rate,
                                   optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True))
    trial.set_user_attr(HOST_ATTR, host)
    trial.set_user_attr(PID_ATTR, pid)
    return trial.number


def test_a_trial_whose_worker_died_is_failed_with_the_reason_and_its_params_queued_again(tmp_path):
    study = optuna.create_study(study_name="s", storage=open_storage(tmp_path), direction="maximize")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no process has now
    dead = _running(study, gone.pid, learning_rate=3e-3)
    alive = _running(study, os.getpid())
    elsewhere = _running(study, gone.pid, host="another-machine")

    failed = fail_dead_trials(study)

    assert [trial.number for trial in failed] == [dead]
    trials = study.get_trials(deepcopy=False)
    assert trials[dead].state == TrialState.FAIL and f"pid {gone.pid}" in trials[dead].user_attrs[REASON_ATTR]
    assert trials[alive].state == trials[elsewhere].state == TrialState.RUNNING  # a live worker; another machine's
    (again,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert again.params == {"train.learning_rate": 3e-3}
    assert dead not in [trial.number for trial in counted(trials)]  # its params still count once, queued
    assert fail_dead_trials(study) == []

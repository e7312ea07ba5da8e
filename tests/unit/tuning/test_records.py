"""A study in MLflow: one parent run, found again by every worker through the study; each trial's run nested under it,
tagged, and ended with the trial's state and reason, also when its worker died and another run of the study finds it."""

import threading

import mlflow
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from cvae_pipeline.config import TrackingParams
from cvae_pipeline.tracking.session import Session
from cvae_pipeline.tracking.store import HOST
from cvae_pipeline.tuning.records import PARENT_ATTR, StudyRecord


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield Session(TrackingParams(experiment="tune", sweep=None, required=True))
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def trial_run(session, record, number):
    """A trial's run as its train stage opens it: the tags the workers give it (trial.trial_environment)."""
    client = session.client
    run = client.create_run(session.experiment_id(), tags=record.trial_tags(number), run_name=f"s-trial-{number}")
    return run.info.run_id


def test_the_trials_runs_nest_under_one_study_run_which_the_study_remembers(session):
    study = optuna.create_study(study_name="s", direction="maximize")
    record = StudyRecord(session, study, ".tune/optuna.journal")
    with record.parent_run({"trials": "4"}):
        parent = record.run_id
        tags = record.trial_tags(2)
        finished, pruned = trial_run(session, record, 0), trial_run(session, record, 1)
        record.end_trial(0, "complete")
        record.end_trial(1, "pruned", "pruned after epoch 2: validation ELBO -120.00")
    assert study.user_attrs[PARENT_ATTR] == parent
    assert tags == {"study": "s", "trial": "2", "machine": HOST, "mlflow.parentRunId": parent,
                    "study_run_id": parent}
    client = session.client
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["kind"] == "study"
    assert client.get_run(pruned).info.status == "KILLED"
    assert client.get_run(pruned).data.tags["reason"].startswith("pruned after epoch 2")
    assert client.get_run(finished).data.tags["state"] == "complete"

    again = StudyRecord(session, study, ".tune/optuna.journal")  # another worker, another day: the same parent
    with again.parent_run({}):
        assert again.run_id == parent


def test_a_machine_that_joins_a_new_study_waits_for_its_creators_run(session):
    storage = optuna.storages.InMemoryStorage()
    creator = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    joiner = StudyRecord(session, optuna.load_study(study_name="s", storage=storage), ".tune/optuna.journal")
    parent = session.client.create_run(session.experiment_id()).info.run_id
    threading.Timer(1.5, lambda: creator.set_user_attr(PARENT_ATTR, parent)).start()
    with joiner.parent_run({}, created=False):
        assert joiner.run_id == parent  # one study run, not one per machine


def test_a_trial_run_that_a_dead_worker_left_running_is_ended_once_its_trial_is_failed(session):
    study = optuna.create_study(study_name="s", direction="maximize")
    record = StudyRecord(session, study, ".tune/optuna.journal")
    with record.parent_run({}):
        left = trial_run(session, record, 0)  # its worker was killed with -9: the run stays RUNNING
        running = trial_run(session, record, 1)  # a trial that another worker is running now
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"reason": "its worker (pid 7 on vm) died"}))
        study.enqueue_trial({})  # trial 1, still to run as far as the study knows
        assert record.close_abandoned("reason") == [0]
    client = session.client
    assert client.get_run(left).info.status == "FAILED"
    assert client.get_run(left).data.tags["reason"] == "its worker (pid 7 on vm) died"
    assert client.get_run(running).info.status == "RUNNING"


def test_a_stopped_study_ends_its_run_killed(session):
    study = optuna.create_study(study_name="s", direction="maximize")
    record = StudyRecord(session, study, ".tune/optuna.journal")
    with pytest.raises(KeyboardInterrupt), record.parent_run({}):
        raise KeyboardInterrupt
    assert session.client.get_run(record.run_id).info.status == "KILLED"

"""The workers of a study on this machine, their trials' training replaced by a stand-in: the budget holds across
parallel workers and runs, a failed trial keeps its reason and the study goes on, a stopped trial's params are queued
again and not counted, a trial below the median is pruned."""

import threading
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from cvae_pipeline.tuning.space import parse_search
from cvae_pipeline.tuning.storage import REASON_ATTR, open_storage
from cvae_pipeline.tuning.trial import Outcome
from cvae_pipeline.tuning.workers import STOPPED_ATTR, Workers, counted
from helpers import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SEARCH = parse_search(yaml.safe_dump({
    "study": "unit", "trials": 5, "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 1},
    "space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}}), BASE)


class Record:
    """StudyRecord without MLflow: what the workers tell it."""

    def __init__(self, study):
        self.study, self.ended = study, []
        self.lock = threading.Lock()

    def trial_tags(self, number):
        return {"trial": str(number)}

    def end_trial(self, number, state, reason=""):
        with self.lock:
            self.ended.append((number, state))


def workers_of(tmp_path: Path, train, trials=5, jobs=2) -> Workers:
    storage = open_storage(tmp_path)
    study = optuna.create_study(study_name="unit", storage=storage, direction="maximize", load_if_exists=True)
    workers = Workers(SEARCH, BASE, tmp_path, storage, tmp_path / "data.npz", Record(study), trials, jobs)
    workers._train = lambda trial, varied: train(trial.number, varied, workers.stop)
    return workers


def complete(number, varied, stop):
    time.sleep(0.05)
    return Outcome("complete", metrics={"validation_elbo": -80.0 - number})


def states(workers):
    return [trial.state for trial in workers.record.study.get_trials(deepcopy=False)]


def test_parallel_workers_run_the_budget_exactly_and_leave_nothing_running(tmp_path):
    started = []

    def train(number, varied, stop):
        started.append(number)
        return complete(number, varied, stop)

    workers = workers_of(tmp_path, train, trials=5, jobs=2)
    workers.run()
    assert len(started) == 5 and len(counted(workers.record.study.trials)) == 5
    assert TrialState.RUNNING not in states(workers) and TrialState.WAITING not in states(workers)
    assert sorted(number for number, state in workers.record.ended if state == "complete") == sorted(started)

    workers_of(tmp_path, train, trials=5).run()  # the budget is the study's: spent, nothing more runs
    assert len(started) == 5
    workers_of(tmp_path, train, trials=7).run()  # a larger budget carries the study on
    assert len(started) == 7 and len(counted(workers.record.study.trials)) == 7


def test_a_failed_trial_keeps_its_reason_and_the_study_goes_on(tmp_path):
    def train(number, varied, stop):
        if number == 0:
            return Outcome("failed", reason="train: the loss became NaN at epoch 1")
        return complete(number, varied, stop)

    workers = workers_of(tmp_path, train, trials=3, jobs=1)
    workers.run()
    trials = workers.record.study.trials
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs[REASON_ATTR] == "train: the loss became NaN at epoch 1"
    assert len(counted(trials)) == 3  # a trial that failed on its own is spent budget


def test_an_error_of_the_worker_itself_fails_the_trial_not_the_study(tmp_path):
    def train(number, varied, stop):
        if number == 0:
            raise OSError(28, "No space left on device")
        return complete(number, varied, stop)

    workers = workers_of(tmp_path, train, trials=2, jobs=1)
    workers.run()
    trials = workers.record.study.trials
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "No space left on device" in trials[0].user_attrs[REASON_ATTR]


def test_stopped_trials_are_queued_again_uncounted_and_run_first_next_time(tmp_path):
    def interrupted(number, varied, stop):
        stop.wait(30)
        return Outcome("stopped", reason="stopped by the user (Ctrl-C) during the trial")

    workers = workers_of(tmp_path, interrupted, trials=4, jobs=2)
    threading.Timer(1.0, workers.stop.set).start()
    workers.run()
    trials = workers.record.study.trials
    stopped = [trial for trial in trials if trial.state == TrialState.FAIL and trial.user_attrs.get(STOPPED_ATTR)]
    assert len(stopped) == 2 and len(trials) == 4
    waiting = [trial for trial in trials if trial.state == TrialState.WAITING]
    assert sorted(trial.params["train.learning_rate"] for trial in waiting) == sorted(
        trial.params["train.learning_rate"] for trial in stopped)
    assert len(counted(trials)) == 2  # the queued copies, not the stopped trials

    ran = []

    def train(number, varied, stop):
        ran.append(varied["train.learning_rate"])
        return complete(number, varied, stop)

    workers_of(tmp_path, train, trials=4, jobs=1).run()
    assert ran[:2] == [trial.params["train.learning_rate"] for trial in waiting]  # their params, first
    assert len(ran) == 4 and len(counted(workers.record.study.trials)) == 4


def test_a_trial_below_the_median_of_the_completed_ones_is_pruned_after_the_warm_up(tmp_path):
    workers = workers_of(tmp_path, complete, trials=1, jobs=1)
    study = workers.load(0, fresh=True)  # as a worker sees it: with tune.yaml's pruner
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 3e-3},
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)},
        value=-90.0, intermediate_values={1: -120.0, 2: -100.0, 3: -90.0}))
    trial = study.ask()
    pruned = workers._prune(trial, {"epoch": 2, "validation_elbo": -140.0})
    assert pruned is not None and "after epoch 2" in pruned and "-140.00" in pruned
    fine = study.ask()
    assert workers._prune(fine, {"epoch": 2, "validation_elbo": -95.0}) is None


def test_with_two_objectives_nothing_is_pruned(tmp_path):
    search = parse_search(yaml.safe_dump({"study": "two", "objectives": ["validation_elbo", "train_seconds"],
                                          "space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2}}}), BASE)
    workers = workers_of(tmp_path, complete)
    workers.search = search
    assert workers._prune(None, {"epoch": 5, "validation_elbo": -1e9}) is None


def test_a_sampled_configuration_that_params_yaml_refuses_fails_before_any_training(tmp_path):
    search = parse_search(yaml.safe_dump({"study": "unit", "space": {
        "train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "train.final_learning_rate": {"low": 0.0, "high": 1e-3}}}), BASE)  # each end valid alone, not every pair
    workers = workers_of(tmp_path, complete)
    workers.search = search
    trial = workers.load(0, fresh=True).ask()
    outcome = Workers._train(workers, trial, {"train.learning_rate": 1e-4, "train.final_learning_rate": 1e-3})
    assert outcome.state == "failed" and "final_learning_rate" in outcome.reason
    assert not (tmp_path / ".tune" / "trials").exists()  # no params file, no process

"""The study's workers on this machine: J threads, each asking Optuna for a trial and running its train stage.

The budget is the study's, across every machine: trials that ended (complete, pruned, failed on their own) and those
running or queued count; a trial that its worker's death or a Ctrl-C cut short does not, since its params are queued
again. A worker asks for a trial only while fewer than the budget count, and a trial that two workers' simultaneous
asks still put over it ends at once, untrained (`over_budget`), counted nowhere.
"""

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from cvae_pipeline import scores
from cvae_pipeline.errors import ParamsError
from cvae_pipeline.fileio import write_bytes_atomic
from cvae_pipeline.tracking.store import HOST
from cvae_pipeline.tuning.records import StudyRecord
from cvae_pipeline.tuning.space import Search
from cvae_pipeline.tuning.storage import HOST_ATTR, PID_ATTR, REASON_ATTR, RETRY
from cvae_pipeline.tuning.trial import Outcome, TrialProcess, train_command, trial_environment

log = logging.getLogger(__name__)

OVER_BUDGET_ATTR, STOPPED_ATTR = "over_budget", "stopped"
TRIALS_FOLDER = Path(".tune") / "trials"


class TrialEnded(Exception):
    """A trial that did not complete: failed (its reason in the trial's `reason`), stopped or over the budget."""


def retried(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The trials whose params were queued again (a dead worker's, a stopped one)."""
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that the budget counts (module docstring)."""
    again = retried(trials)
    return [trial for trial in trials if not (trial.state == TrialState.FAIL
                                              and (trial.number in again or trial.user_attrs.get(OVER_BUDGET_ATTR)))]


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: running trials count as if they had scored badly, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    if not search.prunes:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=search.pruner.startup_trials,
                                       n_warmup_steps=search.pruner.warmup_epochs)


@dataclass
class Workers:
    """The run of a study on this machine: `jobs` workers until the budget of `trials` is spent or `stop` is set."""

    search: Search
    base: dict                # params.yaml's mapping
    root: Path                # the repository
    storage: optuna.storages.BaseStorage
    prepared: Path            # the data every trial trains on
    record: StudyRecord
    trials: int
    jobs: int
    on_trial: Callable[[int, Outcome], None] = lambda number, outcome: None  # a trial's stage ended so
    on_stored: Callable[[], None] = lambda: None  # ... and Optuna stored its state

    def __post_init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stopped: list[int] = []

    def load(self, index: int, fresh: bool) -> optuna.Study:
        """The study as worker `index` sees it, with a sampler of its own: seeded by tune.yaml alone when this
        machine starts the study (a run that can be repeated), else also by the machine and process, so that workers
        joining a study do not propose the same points."""
        seed = self.search.sampler.seed + index
        if not fresh:
            salt = f"{HOST}:{os.getpid()}:{len(self.record.study.trials)}".encode()
            seed += int(hashlib.sha256(salt).hexdigest()[:8], 16)
        return optuna.load_study(study_name=self.search.study, storage=self.storage,
                                 sampler=make_sampler(self.search, seed), pruner=make_pruner(self.search))

    def budget_left(self, study: optuna.Study) -> bool:
        return not self.stop.is_set() and len(counted(study.get_trials(deepcopy=False))) < self.trials

    def run(self) -> None:
        """Every worker to its end; Ctrl-C stops them, each trial's stage first, and is raised again."""
        fresh = not self.record.study.trials
        threads = [threading.Thread(target=self._work, args=(self.load(index, fresh),), name=f"worker-{index}")
                   for index in range(self.jobs)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:
            self.stop.set()
            for thread in threads:
                thread.join()
            raise
        finally:
            self._queue_stopped_again()

    def _work(self, study: optuna.Study) -> None:
        def keep_going(study, trial) -> None:
            self.on_stored()
            if not self.budget_left(study):
                study.stop()

        if self.budget_left(study):
            study.optimize(self._objective, callbacks=[keep_going], catch=(TrialEnded,))

    def _queue_stopped_again(self) -> None:
        study = self.record.study
        for number in self.stopped:
            RETRY(study, study.trials[number])

    def _objective(self, trial: optuna.Trial):
        study = trial.study
        for key, value in ((HOST_ATTR, HOST), (PID_ATTR, os.getpid()), (REASON_ATTR, ""), (STOPPED_ATTR, False)):
            trial.set_user_attr(key, value)  # a retried trial inherits its predecessor's
        ahead = [other for other in counted(study.get_trials(deepcopy=False)) if other.number < trial.number]
        if len(ahead) >= self.trials or self.stop.is_set():
            trial.set_user_attr(OVER_BUDGET_ATTR, True)
            raise TrialEnded("over the budget: another worker asked for the last trial at the same time")
        try:
            outcome = self._train(trial, {dimension.key: dimension.suggest(trial) for dimension in self.search.space})
        except Exception as error:  # this worker's own fault (a full disk...): the trial fails, not the study
            log.exception("trial %d: the worker failed", trial.number)
            outcome = Outcome("failed", reason=f"the worker failed: {type(error).__name__}: {error}")
        self.record.end_trial(trial.number, outcome.state, outcome.reason)
        self.on_trial(trial.number, outcome)
        if outcome.state != "complete":
            trial.set_user_attr(REASON_ATTR, outcome.reason)
        if outcome.state == "pruned":
            raise optuna.TrialPruned(outcome.reason)
        if outcome.state != "complete":
            if outcome.state == "stopped":
                trial.set_user_attr(STOPPED_ATTR, True)
                with self.lock:
                    self.stopped.append(trial.number)
            raise TrialEnded(outcome.reason)
        values = [outcome.metrics[name] for name in self.search.objectives]
        return values[0] if len(values) == 1 else values

    def _train(self, trial: optuna.Trial, varied: dict) -> Outcome:
        name = f"{self.search.study}-trial-{trial.number}"
        try:
            _, raw = self.search.trial_params(self.base, varied, f"trial {trial.number}")
        except ParamsError as error:
            return Outcome("failed", reason=str(error))
        folder = self.root / TRIALS_FOLDER / self.search.study / f"trial-{trial.number}"
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / "params.yaml", yaml.safe_dump(raw, sort_keys=False).encode())
        command, outputs = train_command(self.root, folder, self.prepared, folder / "params.yaml")
        process = TrialProcess(command, outputs, folder / "train.log",
                               trial_environment(name, self.record.trial_tags(trial.number)))
        return process.run(lambda row: self._prune(trial, row), self.stop, self.root)

    def _prune(self, trial: optuna.Trial, row: dict) -> str | None:
        """Report an epoch's validation ELBO; the reason to prune the trial there, or None."""
        if not self.search.prunes:
            return None
        epoch, elbo = int(row["epoch"]), float(row[scores.per_epoch(scores.VALIDATION)])
        trial.report(elbo, epoch)
        if trial.should_prune():
            return (f"pruned after epoch {epoch}: validation ELBO {elbo:.2f}, below the median of the earlier trials "
                    "at that epoch")
        return None

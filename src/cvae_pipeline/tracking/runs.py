"""Which MLflow run records a stage's work, so that every pipeline execution is one complete, findable run.

An execution is one `dvc repro` or `dvc exp run` (one experiment of a queue): the `dvc` process whose children the
stages are. Every run is tagged with the execution that opened it (`execution`).
- train: every new training starts a new run; a training resumed from its checkpoint continues its own run, or, when
  the store does not know that run (another `MLFLOW_TRACKING_URI`), a new run that names it (`resumed_from_run_id`).
- evaluate and visualize log into the training's run when train ran in the same execution. Otherwise the execution
  reused an earlier training (an experiment that changes only `evaluate.*` or `visualize.*`, a forced re-run, a code
  change to evaluate, outputs pulled from a teammate's store) and its results go to a follow-up run of its own, which
  the execution's first such stage opens and the next one finds by its tags: named after the DVC experiment, holding
  every param as used, the training's per-epoch and final metrics and evaluate's metrics (from the DVC outputs), and
  tags that link it to the training run (`training_run_id`) and its model. A later execution never changes a run.

It also names runs (after the DVC experiment, else `<stage>-<commit>-<time>`), tags them with their source, and writes
the run reference that train leaves for the later stages (`evaluation.train_outputs` reads it).
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pandas as pd

from cvae_pipeline import scores
from cvae_pipeline.config import Params
from cvae_pipeline.fileio import write_json_atomic
from cvae_pipeline.tracking.session import Session
from cvae_pipeline.tracking.store import HOST

log = logging.getLogger(__name__)

EXPERIMENT_NAME_ENV = "DVC_EXP_NAME"
BASELINE_ENV = "DVC_EXP_BASELINE_REV"
PARAMS_DIGEST_TAG = "params_digest"
TRAINING_RUN_TAG = "training_run_id"
EXECUTION_TAG = "execution"
# Set by `make tune` for each trial's train stage: `{"name": run name, "tags": {...}}` (its study's parent run, the
# trial's number, the machine).
TRIAL_ENV = "CVAE_TUNE_TRIAL"


def _trial() -> dict:
    return json.loads(os.environ[TRIAL_ENV]) if os.environ.get(TRIAL_ENV) else {}


class TrainingRecord(Protocol):
    """What evaluate and visualize build on (`evaluation.train_outputs.UpstreamOutputs`): train's run reference (the
    file, and the run id it holds), its history and final metrics, and evaluate's metrics, read and checked."""

    run_reference: Path
    run_id: str | None  # None: the training ran without MLflow

    def read(self) -> tuple[pd.DataFrame, dict, dict | None]: ...


def _git(*args: str) -> str:
    """What a git command prints; empty outside a repository or without git."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_name(stage: str) -> str:
    """The DVC experiment's name when DVC runs one (a search's trial: its name), else `<stage>-<commit>-<UTC time>`:
    never MLflow's random name, which is the same for every run of a seeded process (Keras seeds Python's `random`,
    which MLflow draws from)."""
    experiment = os.environ.get(EXPERIMENT_NAME_ENV) or _trial().get("name")
    if experiment:
        return experiment
    commit = _git("rev-parse", "--short=7", "HEAD") or "nogit"
    return f"{stage}-{commit}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def git_commit() -> str:
    """The checkout's commit; empty outside a repository."""
    return _git("rev-parse", "HEAD")


def source_tags(params: Params) -> dict[str, str]:
    """Git commit and dirtiness; for a DVC experiment its name, its baseline commit and its sweep; for a search's
    trial, its tags."""
    tags = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    experiment = os.environ.get(EXPERIMENT_NAME_ENV)
    if experiment:
        tags["dvc_experiment"] = experiment
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        tags["dvc_baseline"] = baseline
    # A sweep is what the user names it, else every experiment run from the same commit.
    sweep = params.tracking.sweep or (baseline[:7] if baseline else None)
    if sweep:
        tags["sweep"] = sweep
    return {**tags, **_trial().get("tags", {})}


def write_run_reference(path: str | Path, run) -> None:
    """The run's ids; nulls when the stage ran without MLflow."""
    write_json_atomic(path, {"run_id": run.info.run_id if run else None,
                             "experiment_id": run.info.experiment_id if run else None})


def params_digest(params: Params) -> str:
    """A short digest of every param as MLflow records them."""
    return hashlib.sha256(json.dumps(params.flat(), sort_keys=True).encode()).hexdigest()[:16]


def changed_params(logged: dict[str, str], params: Params, shown: int = 5) -> str:
    """What differs between a run's logged params and `params`: "evaluate.iwae_k: 5 -> 7", the first few."""
    now = params.flat()
    changed = sorted(key for key in logged.keys() | now.keys() if logged.get(key) != now.get(key))
    described = [f"{key}: {logged.get(key, 'unset')} -> {now.get(key, 'unset')}" for key in changed[:shown]]
    if len(changed) > shown:
        described.append(f"and {len(changed) - shown} more")
    return ", ".join(described) or "the same values under another digest"


@functools.cache
def execution() -> str:
    """This pipeline execution: the nearest `dvc` process above this one (every stage of one `dvc repro`, or of one
    queued experiment, is its child), as host:pid:start; this process itself when no `dvc` runs it."""
    import psutil  # DVC's dependency too

    process = psutil.Process()
    for parent in process.parents():
        try:
            if any(Path(argument).name == "dvc" for argument in parent.cmdline()[:2]):
                process = parent
                break
        except psutil.Error:  # gone, or not ours to read
            continue
    return f"{HOST}:{process.pid}:{process.create_time():.3f}"


@contextlib.contextmanager
def training_run(session: Session, params: Params, resumed_run_id: str | None,
                 tags: dict[str, str]) -> Iterator:
    """The run of this training: a new one, or the run of the interrupted training it resumes."""
    run_id, digest = resumed_run_id, params_digest(params)
    extra = {PARAMS_DIGEST_TAG: digest, EXECUTION_TAG: execution()}
    earlier = session.get_run(run_id) if run_id else None
    if run_id and not session.offline and (earlier is None or earlier.data.tags.get(PARAMS_DIGEST_TAG) != digest):
        why = ("is not in the store " + session.shown_uri if earlier is None
               else f"was logged with other params ({changed_params(earlier.data.params, params)})")
        log.warning("the checkpoint's MLflow run %s %s; recording the rest of this training in a new run that names "
                    "it (tag resumed_from_run_id), with the epochs before", run_id, why)
        extra["resumed_from_run_id"], run_id = run_id, None
    # The training alone samples system metrics: the stages that reopen its run add no second monitor.
    with session.open_run(run_id, run_name("train"), {**tags, **extra}, system_metrics=True) as run:
        if run is not None and run_id is None:
            session.log_params(params)
        yield run


def trained_model(session: Session, run_id: str | None):
    """The model logged by the training run `run_id` (`.model_id`, `.model_uri`), or None: trained without MLflow
    (no run id), or the store does not know the run."""
    return session.training_model(run_id) if run_id and session.get_run(run_id) else None


@contextlib.contextmanager
def stage_run(session: Session, params: Params, stage: str, upstream: TrainingRecord) -> Iterator:
    """The run that records `stage` of this execution: the training's run, or a follow-up run (module docstring).
    Yields None, logging nothing, when training ran without MLflow or the store is offline."""
    run_id = upstream.run_id
    history, final, metrics = upstream.read()  # before any work: a damaged file stops the stage here
    if run_id is None:
        session.disable(f"{upstream.run_reference}: training ran without MLflow; these results stay in the DVC files")
    plan = _plan(session, params, stage, run_id, upstream.run_reference) if run_id else None
    if plan is None:
        yield None
        return
    target, training = plan
    if target == run_id:
        with session.open_run(run_id) as run:
            yield run
        return
    tags = {**source_tags(params), PARAMS_DIGEST_TAG: params_digest(params), TRAINING_RUN_TAG: run_id,
            EXECUTION_TAG: execution()}
    with session.open_run(target, run_name(stage), tags) as run:
        if run is not None and target is None:
            _record_upstream(session, params, training, history, final, metrics if stage != "evaluate" else None)
        yield run


def _plan(session: Session, params: Params, stage: str, run_id: str,
          reference: Path) -> tuple[str | None, object] | None:
    """(the run to reopen: the training's `run_id`, this execution's follow-up, or None for a new follow-up; the
    training run, if the store knows it). None when the store is offline."""
    training = session.get_run(run_id)
    if session.offline:
        return None
    if training is None:
        log.warning("%s names MLflow run %s, which the store %s does not know (the outputs came from another store); "
                    "recording %s in a new run that names it (tag %s)", reference, run_id, session.shown_uri, stage,
                    TRAINING_RUN_TAG)
    elif training.data.tags.get(EXECUTION_TAG) == execution():
        return run_id, training
    found = session.search_runs(f"tags.{EXECUTION_TAG} = '{execution()}' and tags.{TRAINING_RUN_TAG} = '{run_id}'")
    return None if session.offline else ((found[0].info.run_id if found else None), training)


def evaluation_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """evaluate's metrics (`{split: {metric: value}}`, as in its DVC output) as MLflow names them: `eval_test_elbo`,
    `eval_validation_elbo`, ..."""
    return {scores.evaluated(split, key): value for split, found in metrics.items() for key, value in found.items()}


def _record_upstream(session: Session, params: Params, training, history: pd.DataFrame, final: dict,
                     metrics: dict | None) -> None:
    """A follow-up run starts as the whole record of what it builds on: params, the training's curves and final
    metrics, evaluate's metrics (when it ran in an earlier execution), and a link to the training's logged model."""
    session.log_params(params)
    session.log_missing_epochs(history.to_dict("records"))
    session.log_metrics({scores.final(key): value for key, value in final.items()})
    if metrics is not None:
        session.log_metrics(evaluation_metrics(metrics),
                            tags={"eval_metrics_from": "the DVC outputs of an earlier execution's evaluate"})
    model = training and session.training_model(training.info.run_id)  # none when the store lacks the run
    if model:
        session.set_tags({"training_model_uri": model.model_uri})

"""Which MLflow run records a stage's work, so that every pipeline execution is one complete, findable run.

- train: every new training starts a new run; a training resumed from its checkpoint continues its own run, or, when
  the store does not know that run (another `MLFLOW_TRACKING_URI`), a new run that names it (`resumed_from_run_id`).
- evaluate and visualize log into the training's run when they complete the execution that trained: the run was
  logged with exactly the params they run with (`params_digest`) and holds none of their results yet. Otherwise the
  execution reused an earlier training (an experiment that changes only `evaluate.*` or `visualize.*`, a forced
  re-run, outputs pulled from a teammate's store) and its results go to a follow-up run of its own: named after the
  DVC experiment, holding every param as used, the training's per-epoch and final metrics (read from train's DVC
  outputs), evaluate's metrics, and tags that link it to the training run (`training_run_id`) and its model.
  The training's run is left exactly as it was. Both stages of one execution find the same follow-up run by its tags.
"""

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cvae_pipeline import tracking
from cvae_pipeline.config import Params
from cvae_pipeline.errors import UserInputError

log = logging.getLogger(__name__)

PARAMS_DIGEST_TAG = "params_digest"
TRAINING_RUN_TAG = "training_run_id"


def done_tag(stage: str) -> str:
    """The tag that says a run holds this stage's results (set in the same call that logs them)."""
    return f"stage.{stage}"


def params_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(tracking.flatten(params), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Upstream:
    """The DVC outputs of the stages before this one: the record a follow-up run is made of."""

    run_reference: Path
    train_history: Path
    train_metrics: Path
    metrics: Path | None = None  # evaluate's, for the stages after it

    def read(self) -> tuple[pd.DataFrame, dict, dict | None]:
        """Train's history and final metrics, and evaluate's metrics; one clear line for a missing or damaged file."""
        history = _read(self.train_history, "train", pd.read_csv)
        if "epoch" not in history or history.empty:
            raise UserInputError(f"{self.train_history}: damaged training history (no epochs); run `dvc repro train`")
        final = _read(self.train_metrics, "train", lambda path: json.loads(Path(path).read_text(encoding="utf-8")))
        metrics = None
        if self.metrics is not None:
            metrics = _read(self.metrics, "evaluate", lambda path: json.loads(Path(path).read_text(encoding="utf-8")))
        for path, payload in ((self.train_metrics, final), (self.metrics, metrics)):
            if payload is not None and not (isinstance(payload, dict) and all(
                    isinstance(value, int | float) for value in payload.values())):
                raise UserInputError(f"{path}: damaged metrics file (not a mapping of numbers); run `dvc repro`")
        return history, final, metrics


def _read(path: Path, stage: str, reader):
    try:
        return reader(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: missing; run `dvc repro {stage}` first") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as error:
        raise UserInputError(f"{path}: damaged ({type(error).__name__}: {error}); run `dvc repro {stage}` "
                             "to write it again") from None


@contextlib.contextmanager
def training_run(params: Params, resumed_run_id: str | None, tags: dict[str, str]) -> Iterator:
    """The run of this training: a new one, or the run of the interrupted training it resumes."""
    cfg, run_id, digest = params.tracking, resumed_run_id, params_digest(params)
    extra = {PARAMS_DIGEST_TAG: digest}
    if run_id and tracking.connect(cfg):
        earlier = tracking.get_run(run_id)
        if earlier is None or earlier.data.tags.get(PARAMS_DIGEST_TAG) != digest:
            why = ("is not in the store " + tracking.tracking_uri() if earlier is None
                   else "was logged with other params (tracking.* or train.strategy changed)")
            log.warning("the checkpoint's MLflow run %s %s; recording the rest of this training in a new run that "
                        "names it (tag resumed_from_run_id), with the epochs before", run_id, why)
            extra["resumed_from_run_id"], run_id = run_id, None
    with tracking.active_run(cfg, run_id, tracking.run_name("train"), {**tags, **extra}) as run:
        if run is not None and run_id is None:
            tracking.log_params(params)
        yield run


@contextlib.contextmanager
def stage_run(params: Params, stage: str, upstream: Upstream) -> Iterator:
    """The run that records `stage` of this execution: the training's run, or a follow-up run (module docstring).
    Yields None, logging nothing, when training ran without MLflow or the store is offline."""
    run_id = tracking.read_run_id(upstream.run_reference)
    history, final, metrics = upstream.read()  # before any work: a damaged file stops the stage here
    if run_id is None:
        tracking.disable(f"{upstream.run_reference}: training ran without MLflow; these results stay in the DVC files")
        yield None
        return
    cfg, digest = params.tracking, params_digest(params)
    if not tracking.connect(cfg):
        yield None
        return
    training = tracking.get_run(run_id)
    if training is None:
        log.warning("%s names MLflow run %s, which the store %s does not know (the outputs came from another "
                    "store); recording %s in a new run that names it (tag %s)", upstream.run_reference, run_id,
                    tracking.tracking_uri(), stage, TRAINING_RUN_TAG)
    elif training.data.tags.get(PARAMS_DIGEST_TAG) == digest and done_tag(stage) not in training.data.tags:
        with tracking.active_run(cfg, run_id) as run:
            yield run
        return
    target = _follow_up(cfg.experiment, run_id, digest, stage)
    tags = {**tracking.source_tags(params), PARAMS_DIGEST_TAG: digest, TRAINING_RUN_TAG: run_id}
    with tracking.active_run(cfg, target, tracking.run_name(stage), tags) as run:
        if run is not None and target is None:
            _record_upstream(params, run_id, history, final, metrics, stage)
        yield run


def _follow_up(experiment_name: str, training_run_id: str, digest: str, stage: str) -> str | None:
    """This execution's follow-up run if an earlier stage of it made one (same training, params and experiment,
    without this stage's results yet); None: make one."""
    experiment = os.environ.get(tracking.EXPERIMENT_NAME_ENV)
    for run in tracking.search_runs(experiment_name, f"tags.{TRAINING_RUN_TAG} = '{training_run_id}' and "
                                    f"tags.{PARAMS_DIGEST_TAG} = '{digest}' and attributes.status != 'RUNNING'"):
        tags = run.data.tags
        if tags.get("dvc_experiment") == experiment and done_tag(stage) not in tags:
            return run.info.run_id
    return None


def _record_upstream(params: Params, training_run_id: str, history: pd.DataFrame, final: dict,
                     metrics: dict | None, stage: str) -> None:
    """A follow-up run starts as the whole record of what it builds on: params, the training's curves and final
    metrics, evaluate's metrics (when it ran earlier), and a link to the training's logged model."""
    tracking.log_params(params)
    tracking.log_missing_epochs(history.to_dict("records"))
    tracking.log_metrics({f"final_{key}": value for key, value in final.items()})
    if metrics is not None and stage != "evaluate":
        tracking.log_metrics({f"eval_{key}": value for key, value in metrics.items()},
                             tags={"eval_metrics_from": "the DVC outputs of an earlier evaluate"})
    model = tracking.training_model_uri(training_run_id)
    if model:
        tracking.set_tags({"training_model_uri": model})

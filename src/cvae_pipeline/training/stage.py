"""The train stage: resume an interrupted training of the same params, data and code, else train from epoch 1 in a new
MLflow run; log every epoch once; write the stage's outputs; mark the checkpoint finished."""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from cvae_pipeline import scores
from cvae_pipeline.config import TUTORIAL_ELBO, Params
from cvae_pipeline.data import PreparedData
from cvae_pipeline.fileio import atomic_path, remove_leftover_temporaries, write_json_atomic
from cvae_pipeline.tracking import lineage, runs
from cvae_pipeline.tracking.session import Session
from cvae_pipeline.training.checkpoints import Progress
from cvae_pipeline.training.distribution import require_same_on_every_worker
from cvae_pipeline.training.loop import Trainer
from cvae_pipeline.training.process import set_up

log = logging.getLogger(__name__)

def log_model(client, run_id: str, model_file: Path, example: np.ndarray) -> None:
    # MLflow's pyfunc flavour: imported only when a model is logged (it takes seconds).
    from cvae_pipeline.tracking import logged_model

    logged_model.log_model(client, run_id, model_file, example)


@dataclass(frozen=True)
class TrainOutputs:
    model: Path
    history: Path
    metrics: Path
    progress: Path
    run: Path
    checkpoint: Path
    settings: Path  # what this machine made of the params: device, precision, XLA, replicas; TensorFlow's version


def final_metrics(history: list[dict], split: str) -> dict[str, float]:
    """The last epoch's metrics, the total training time, the median throughput, and the time to quality: the first
    epoch whose ELBO on `split` (the per-epoch scores' split) reached the tutorial's, and the seconds from the stage's
    start to its end (absent when none did)."""
    last, columns = history[-1], scores.epoch_columns(split)
    final = {
        "epochs": last["epoch"],
        **{key: last[key] for key in (scores.TRAIN_LOSS, *columns)},
        "train_seconds": sum(row["epoch_seconds"] for row in history),
        "elapsed_seconds": last["elapsed_seconds"],
        "images_per_second": float(np.median([row["images_per_second"] for row in history])),
    }
    reached = next((row for row in history if row[scores.per_epoch(split)] >= TUTORIAL_ELBO), None)
    if reached is not None:
        final.update(epoch_to_quality=reached["epoch"], seconds_to_quality=reached["elapsed_seconds"])
    return final


def write_outputs(trainer: Trainer, progress: Progress, final: dict[str, float], settings: dict[str, str],
                  outputs: TrainOutputs) -> None:
    with atomic_path(outputs.model) as temporary:
        trainer.model.save(temporary)
    with atomic_path(outputs.history) as temporary:
        pd.DataFrame(progress.history).to_csv(temporary, index=False, float_format="%.6g")
    with atomic_path(outputs.progress) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, grids=np.stack(progress.grids), epochs=np.arange(len(progress.grids)))
    write_json_atomic(outputs.metrics, final)
    write_json_atomic(outputs.settings, settings)


def train_and_track(params: Params, data: PreparedData, outputs: TrainOutputs,
                    script: Path | None = None, started: float | None = None) -> dict[str, float]:
    """The train stage: resume an interrupted training or start afresh, one MLflow run per training, then the
    declared outputs, and the checkpoint marked finished. `script`: the stage's entry point (its code is in the
    checkpoint's fingerprint); `started`: its `time.perf_counter()` at start. Returns the final metrics."""
    session = Session(params.tracking)
    session.connect()  # a tracking server that does not answer stops the stage before any work
    for path in dataclasses.astuple(outputs):
        remove_leftover_temporaries(path)  # of a run that was killed while writing
    trainer = Trainer(params, data, set_up(params), script, started)
    checkpoint = trainer.checkpoint(outputs.checkpoint)
    progress, state = trainer.start(checkpoint), trainer.state
    # Workers that resumed from different checkpoints would apply one gradient to different weights, silently.
    require_same_on_every_worker(trainer.strategy, {"checkpoint epoch": state.epoch,
                                                    "training settings": int(trainer.fingerprint[:12], 16)},
                                 f"give every worker the same commit, params, data and {outputs.checkpoint}")
    if not trainer.is_chief:  # a cluster's other workers train in lockstep and write the same files, unlogged
        session.disable("this worker is not the chief, which logs the run")
    log.info("training on %s with %s precision (%s), XLA %s, %d replica(s); MLflow store %s",
             trainer.machine.describe(), trainer.precision.value, trainer.precision.reason,
             "on" if trainer.jit_compile.value else "off", trainer.strategy.num_replicas_in_sync, session.shown_uri)
    if trainer.scorer.split == scores.TEST:
        log.warning("no validation set (data.validation_size is 0): every epoch is scored on the test set, as the "
                    "tutorial does, so the test numbers of a run chosen by them are optimistic")
    settings = {**trainer.settings(), "tensorflow_version": tf.__version__}
    tags = {**runs.source_tags(params), **settings}
    with runs.training_run(session, params, state.run_id, tags) as run:
        if run is not None:
            state.run_id = run.info.run_id
        # Epochs are logged after their checkpoint; those a kill (or MLflow's absence) left unlogged are logged now.
        session.log_missing_epochs(progress.history)
        # What it trained on, and what chose its epochs: the split every epoch is scored on.
        lineage.log_datasets(session, data, params.data, [scores.TRAIN, trainer.scorer.split])
        progress = trainer.fit(progress, checkpoint,
                               lambda epoch, metrics: session.log_missing_epochs([{"epoch": epoch, **metrics}]))
        final = final_metrics(progress.history, trainer.scorer.split)
        write_outputs(trainer, progress, final, settings, outputs)
        runs.write_run_reference(outputs.run, run)
        session.log_metrics({scores.final(key): value for key, value in final.items()}, once=True,
                            what="final metrics")
        example = trainer.scorer.images[:2].astype(np.float32)
        session.log_model_once(lambda client, run_id: log_model(client, run_id, outputs.model, example))
    # Only now is there nothing left to resume: a later run of this stage, for whatever reason, trains afresh.
    checkpoint.save(state.snapshot(), progress, finished=True)
    return final

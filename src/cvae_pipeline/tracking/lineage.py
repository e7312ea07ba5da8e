"""Where a run's data came from, in MLflow: each split of the prepared data that a stage uses is a dataset input of its
run (its own digest, the prepared file's path and the MD5 that DVC records for it, the data params, the commit), linked
to the logged model it trained or tested."""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cvae_pipeline import scores
from cvae_pipeline.config import DataParams
from cvae_pipeline.data import PreparedData
from cvae_pipeline.tracking import runs
from cvae_pipeline.tracking.session import Session

DATASET_NAME = "mnist_binarized"
# What a stage uses each split for (MLflow's context).
CONTEXTS = {scores.TRAIN: "training", scores.VALIDATION: "validation", scores.TEST: "testing"}


def file_md5(path: Path) -> str:
    """What DVC records as a file output's `md5` in dvc.lock: the MD5 of its bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
    """The MD5 of a split's images (their shape and 0/1 pixels): the same images, the same digest, whatever file they
    were read from."""
    digest = hashlib.md5(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def log_datasets(session: Session, data: PreparedData, cfg: DataParams, splits: Iterable[str],
                 model_id: str | None = None) -> dict[str, tuple[str, str]]:
    """Record `splits` (of train, validation, test) of the prepared `data` as inputs of the session's run, in one
    write, each an MLflow dataset `mnist_binarized/<split>` with the digest of its own images (and with the logged model
    `model_id` that they were used on). Returns each split's (name, digest), which the metrics computed on it carry;
    empty when `data` was not read from a prepared file."""
    if data.source is None:
        return {}
    from mlflow.entities import Dataset

    commit = runs.git_commit()
    shared = {"dvc_path": data.source.as_posix(), "dvc_md5": file_md5(data.source),  # once, whatever the splits
              **{f"data.{key}": json.dumps(value) for key, value in cfg.model_dump().items()},
              **({"git_commit": commit} if commit else {})}
    keys, inputs = {}, []
    for split in splits:
        keys[split] = (f"{DATASET_NAME}/{split}", images_digest(getattr(data, split).images))
        # Metadata only: the data itself is DVC's to store.
        dataset = Dataset(name=keys[split][0], digest=keys[split][1], source_type="local",
                          source=json.dumps({"uri": data.source.as_posix(), "split": split}))
        inputs.append((dataset, {"mlflow.data.context": CONTEXTS[split], **shared}))
    session.log_inputs(inputs, model_id)
    return keys

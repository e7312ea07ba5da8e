"""Where a run's data came from, in MLflow: the prepared dataset as an input of the run (the digest DVC records for it,
its path, its params, the commit), linked to the logged model it trained or tested."""

import hashlib
import json
from pathlib import Path

from cvae_pipeline.config import DataParams
from cvae_pipeline.tracking import runs
from cvae_pipeline.tracking.session import Session

DATASET_NAME = "mnist_binarized"
# The split of the prepared file a stage uses, and what for (MLflow's context).
CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}


def file_md5(path: Path) -> str:
    """What DVC records as a file output's `md5` in dvc.lock: the MD5 of its bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_dataset(path: Path, split: str):
    """One split of the prepared data as an MLflow dataset (metadata only: the data itself is DVC's to store), named
    `mnist_binarized/<split>`, its digest that of the whole file."""
    from mlflow.entities import Dataset

    return Dataset(name=f"{DATASET_NAME}/{split}", digest=file_md5(path), source_type="local",
                   source=json.dumps({"uri": path.as_posix()}))


def dataset_key(path: Path, split: str) -> tuple[str, str]:
    """(name, digest) of a split of the prepared data, as the metrics computed on it record them."""
    return f"{DATASET_NAME}/{split}", file_md5(path)


def log_dataset(session: Session, path: Path, cfg: DataParams, split: str, model_id: str | None = None) -> None:
    """Record a split (train, validation, test) of the prepared data at `path` as an input of the session's run (with
    the logged model `model_id` that it was used on)."""
    commit = runs.git_commit()
    tags = {"mlflow.data.context": CONTEXTS[split], "dvc_path": path.as_posix(), "dvc_md5": file_md5(path),
            **{f"data.{key}": json.dumps(value) for key, value in cfg.model_dump().items()},
            **({"git_commit": commit} if commit else {})}
    session.log_input(prepared_dataset(path, split), tags, model_id)

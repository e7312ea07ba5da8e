"""What the earlier stages left for the later ones: their DVC outputs, read and checked once, by this one reader.

evaluate and visualize read train's run reference, history and final metrics (and visualize evaluate's metrics) to
know which MLflow run records them and, for a follow-up run, to copy the whole record into it. A missing or damaged
file stops the stage before any work, in one line that names the file and the `dvc repro` that writes it again.
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cvae_pipeline import scores
from cvae_pipeline.errors import UserInputError

HISTORY_COLUMNS = ("epoch", scores.TRAIN_LOSS)


@dataclass(frozen=True)
class UpstreamOutputs:
    """Paths of the earlier stages' outputs; `run_id` and `read` parse and check them (once). What
    `tracking.runs.stage_run` builds on (`runs.TrainingRecord`)."""

    run_reference: Path
    train_history: Path
    train_metrics: Path
    metrics: Path | None = None  # evaluate's, for the stages after it

    @functools.cached_property
    def run_id(self) -> str | None:
        """The MLflow run that train recorded (None: it ran without MLflow)."""
        reference = _json(self.run_reference, "train", "MLflow run reference")
        run_id = reference.get("run_id", ...) if isinstance(reference, dict) else ...
        if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum()):
            raise _damaged(self.run_reference, "train", "MLflow run reference",
                           "no run_id" if run_id is ... else f"run_id {run_id!r} is not a run id")
        return run_id

    def read(self) -> tuple[pd.DataFrame, dict, dict | None]:
        """Train's history and final metrics, and evaluate's metrics (None when not asked for)."""
        return self._contents

    @functools.cached_property
    def _contents(self) -> tuple[pd.DataFrame, dict, dict | None]:
        history = _history(self.train_history)
        final = _json(self.train_metrics, "train", "metrics")
        if not _numbers(final):
            raise _damaged(self.train_metrics, "train", "metrics", "not a mapping of metric names to numbers")
        if final.get("epochs") != len(history):
            raise UserInputError(f"{self.train_metrics}: damaged or out of step with {self.train_history} "
                                 f"(epochs {final.get('epochs')!r}, history {len(history)}); run `dvc repro train`")
        metrics = _split_metrics(self.metrics) if self.metrics is not None else None
        return history, final, metrics


def _damaged(path: Path, stage: str, what: str, why: str) -> UserInputError:
    return UserInputError(f"{path}: damaged {what} ({why}); run `dvc repro {stage}` to write it again")


def _read(path: Path, stage: str, what: str, reader):
    """`reader(path)`; a missing file, or one the reader cannot parse, is one line that says which `dvc repro`
    writes it."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: no {what}; run `dvc repro {stage}` first") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as error:
        raise _damaged(path, stage, what, f"{type(error).__name__}: {error}") from None


def _json(path: Path, stage: str, what: str):
    return _read(path, stage, what, lambda found: json.loads(found.read_text(encoding="utf-8")))


def _history(path: Path) -> pd.DataFrame:
    """One row per epoch, 1..n, every value a finite number."""
    history = _read(path, "train", "training history", pd.read_csv)
    expected = [*HISTORY_COLUMNS, *scores.epoch_columns(scores.scored_split(history))]
    missing = [column for column in expected if column not in history]
    if missing:
        raise _damaged(path, "train", "training history", f"no column {missing[0]}")
    numbers = history.apply(pd.to_numeric, errors="coerce")
    if history.empty or not np.isfinite(numbers.to_numpy(dtype=float)).all():
        raise _damaged(path, "train", "training history", "an empty or non-numeric value")
    if numbers["epoch"].tolist() != list(range(1, len(history) + 1)):
        raise _damaged(path, "train", "training history", "epochs are not 1, 2, ...")
    return numbers


def _numbers(payload) -> bool:
    """Whether `payload` is a non-empty mapping of names to finite numbers."""
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
        for value in payload.values())


def _split_metrics(path: Path) -> dict:
    """evaluate's: the test set's metrics, and the validation set's where there is one, each a mapping of names to
    finite numbers."""
    payload = _json(path, "evaluate", "metrics")
    if not (isinstance(payload, dict) and scores.TEST in payload and set(payload) <= {scores.TEST, scores.VALIDATION}
            and all(_numbers(found) for found in payload.values())):
        raise _damaged(path, "evaluate", "metrics", "not the test and validation sets' metrics, each a mapping of "
                                                    "names to numbers")
    return payload

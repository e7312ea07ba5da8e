"""What the earlier stages left for the later ones: their DVC outputs, read and checked once.

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

from cvae_pipeline.errors import UserInputError

HISTORY_COLUMNS = ("epoch", "train_loss")
SCORES = ("elbo", "reconstruction", "kl")  # each epoch's, on the validation set, or the test set where there is none


def scored_split(history: pd.DataFrame) -> str:
    """The split each epoch of `history` was scored on: validation, or test (no validation set)."""
    return "validation" if "validation_elbo" in history else "test"


@dataclass(frozen=True)
class Upstream:
    """Paths of the earlier stages' outputs; `read` parses and checks them (once)."""

    run_reference: Path
    train_history: Path
    train_metrics: Path
    metrics: Path | None = None  # evaluate's, for the stages after it

    def read(self) -> tuple[pd.DataFrame, dict, dict | None]:
        """Train's history and final metrics, and evaluate's metrics (None when not asked for)."""
        return self._contents

    @functools.cached_property
    def _contents(self) -> tuple[pd.DataFrame, dict, dict | None]:
        history = _history(self.train_history)
        final = _metrics(self.train_metrics, "train")
        if final.get("epochs") != len(history):
            raise UserInputError(f"{self.train_metrics}: damaged or out of step with {self.train_history} "
                                 f"(epochs {final.get('epochs')!r}, history {len(history)}); run `dvc repro train`")
        metrics = _split_metrics(self.metrics) if self.metrics is not None else None
        return history, final, metrics


def _damaged(path: Path, stage: str, why: str) -> UserInputError:
    return UserInputError(f"{path}: damaged ({why}); run `dvc repro {stage}` to write it again")


def _read(path: Path, stage: str, reader):
    try:
        return reader(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: missing; run `dvc repro {stage}` first") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as error:
        raise _damaged(path, stage, f"{type(error).__name__}: {error}") from None


def _history(path: Path) -> pd.DataFrame:
    """One row per epoch, 1..n, every value a finite number."""
    history = _read(path, "train", pd.read_csv)
    expected = [*HISTORY_COLUMNS, *(f"{scored_split(history)}_{score}" for score in SCORES)]
    missing = [column for column in expected if column not in history]
    if missing:
        raise _damaged(path, "train", f"no column {missing[0]}")
    numbers = history.apply(pd.to_numeric, errors="coerce")
    if history.empty or not np.isfinite(numbers.to_numpy(dtype=float)).all():
        raise _damaged(path, "train", "an empty or non-numeric value")
    if numbers["epoch"].tolist() != list(range(1, len(history) + 1)):
        raise _damaged(path, "train", "epochs are not 1, 2, ...")
    return numbers


def _numbers(payload) -> bool:
    """Whether `payload` is a non-empty mapping of names to finite numbers."""
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
        for value in payload.values())


def _metrics(path: Path, stage: str) -> dict:
    """A JSON mapping of names to finite numbers."""
    payload = _read(path, stage, lambda p: json.loads(Path(p).read_text(encoding="utf-8")))
    if not _numbers(payload):
        raise _damaged(path, stage, "not a mapping of metric names to numbers")
    return payload


def _split_metrics(path: Path) -> dict:
    """evaluate's: the test set's metrics, and the validation set's where there is one, each a mapping of names to
    finite numbers."""
    payload = _read(path, "evaluate", lambda p: json.loads(Path(p).read_text(encoding="utf-8")))
    if not (isinstance(payload, dict) and "test" in payload and set(payload) <= {"test", "validation"}
            and all(_numbers(found) for found in payload.values())):
        raise _damaged(path, "evaluate", "not the test and validation sets' metrics, each a mapping of names to "
                                         "numbers")
    return payload

"""A training's state as one object, and its resumable checkpoint: one file, replaced atomically after every epoch.

`TrainingState` is what an uninterrupted run carries from one epoch to the next: the model, the optimizer (its
moments, its step count and the moving average of the weights), the noise generator, the epoch and the MLflow run id.
It is saved and restored whole and by name (`model/encoder/encoder_conv_1/kernel`, `optimizer/...`,
`generator/state`), never by position. The record of the training so far, the per-epoch history and progress grids
(`Progress`), is kept apart from it, in the same file.

Only the training that wrote a checkpoint, interrupted before it finished, may resume it: a fingerprint of the params,
the data and the code guards against resuming another configuration, and a finished training marks its checkpoint
so, which makes any later run (`dvc repro -f`, a changed param that does not enter the fingerprint) start afresh. A
damaged file is never fatal: it is ignored with a warning. `Saver` writes each epoch's file on a thread of its own
while the next epoch trains.
"""

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cvae_pipeline.fileio import DAMAGED_FILE_ERRORS, atomic_path

if TYPE_CHECKING:  # for annotations only: the file itself is NumPy's
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

VARIABLES = "variables/"  # the prefix of the state's arrays in the file, before their names


def fingerprint(*parts: object) -> str:
    """A digest of JSON-able configuration and NumPy arrays."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A training state's values at one moment, copied: they may be written later, while training goes on."""

    epoch: int
    run_id: str | None
    variables: dict[str, np.ndarray]


@dataclass(frozen=True)
class Progress:
    """The record of a training so far: one history row and one (16, 28, 28) uint8 progress grid per epoch (the
    grids from epoch 0, the initial weights)."""

    history: list[dict] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)


class TrainingState:
    """The model, its optimizer with the average of the weights, the noise generator, the epoch the training
    completed and its MLflow run id."""

    def __init__(self, model: "keras.Model", optimizer: "keras.optimizers.Optimizer",
                 generator: "tf.random.Generator", epoch: int = 0, run_id: str | None = None):
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.epoch, self.run_id = epoch, run_id

    def named_variables(self) -> dict:
        """Every variable of the state by its name."""
        named = {f"model/{variable.path}": variable for variable in self.model.weights}
        named |= {f"optimizer/{variable.path}": variable for variable in self.optimizer.variables}
        named["generator/state"] = self.generator.state
        if len(named) != len(self.model.weights) + len(self.optimizer.variables) + 1:
            raise ValueError("two variables of the training state share a name")  # a bug: names must identify them
        return named

    def snapshot(self) -> Snapshot:
        return Snapshot(self.epoch, self.run_id, {name: np.array(variable.numpy())
                                                  for name, variable in self.named_variables().items()})

    def restore(self, snapshot: Snapshot) -> None:
        """Put the snapshot's values in place, by name. A snapshot that does not fit (a name missing or unknown, a
        shape that differs) raises ValueError naming it, and changes nothing."""
        named = self.named_variables()
        unknown = sorted(snapshot.variables.keys() - named.keys())
        missing = sorted(named.keys() - snapshot.variables.keys())
        if unknown:
            raise ValueError(f"it holds {unknown[0]}, which this training has not")
        if missing:
            raise ValueError(f"it lacks {missing[0]}")
        for name, variable in named.items():
            if tuple(snapshot.variables[name].shape) != tuple(variable.shape):
                raise ValueError(f"{name} has shape {snapshot.variables[name].shape}, not {tuple(variable.shape)}")
        for name, variable in named.items():
            variable.assign(snapshot.variables[name])
        self.epoch, self.run_id = snapshot.epoch, snapshot.run_id


class Checkpoint:
    """One training's checkpoint file, under the training's fingerprint `key`."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def save(self, snapshot: Snapshot, progress: Progress, finished: bool = False) -> None:
        """Write the state's `snapshot` and the `progress` so far; `finished`: nothing is left to resume."""
        arrays = {"fingerprint": np.array(self.key), "epoch": np.array(snapshot.epoch),
                  "run_id": np.array(snapshot.run_id or ""), "finished": np.array(finished),
                  "history": np.array(json.dumps(progress.history)), "grids": np.stack(progress.grids),
                  **{VARIABLES + name: value for name, value in snapshot.variables.items()}}
        with atomic_path(self.path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    def read(self) -> tuple[Snapshot, Progress] | None:
        """What the file holds, when it exists, whole, of this training, unfinished; None (start afresh) else."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                if str(archive["fingerprint"]) != self.key:
                    log.info("%s is from other params, data or code; training starts afresh at epoch 1", self.path)
                    return None
                if bool(archive["finished"]):
                    log.info("%s is of a training that finished; this one starts afresh at epoch 1", self.path)
                    return None
                variables = {name.removeprefix(VARIABLES): archive[name] for name in archive.files
                             if name.startswith(VARIABLES)}
                return (Snapshot(int(archive["epoch"]), str(archive["run_id"]) or None, variables),
                        Progress(json.loads(str(archive["history"])), list(archive["grids"])))
        except DAMAGED_FILE_ERRORS as error:
            # Only a complete file is ever renamed into place, so this is damage from elsewhere: say so, start afresh.
            log.warning("%s is damaged (%s: %s); ignoring it, training starts afresh at epoch 1", self.path,
                        type(error).__name__, error)
            return None

    def restore(self, state: TrainingState) -> Progress | None:
        """The progress of the interrupted training this file holds, its state put in place in `state`; None (start
        afresh, `state` untouched) when there is none to resume."""
        found = self.read()
        if found is None:
            return None
        snapshot, progress = found
        try:
            state.restore(snapshot)
        except ValueError as error:  # whole, but not of this model and optimizer
            log.warning("%s is damaged (%s); ignoring it, training starts afresh at epoch 1", self.path, error)
            return None
        log.info("resuming after epoch %d from %s", snapshot.epoch, self.path)
        return progress


class Saver:
    """Runs each epoch's bookkeeping (write the checkpoint, then log the epoch) on a background thread, in order, one
    epoch at a time, while the next epoch trains: a write that waits on a busy disk does not stall training. The
    checkpoint stays whole and atomic (the arrays are copied before the work is handed over, the file is renamed
    into place once complete); an error surfaces in the training thread at the next epoch or at the end."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, work: Callable[[], None]) -> None:
        self.wait()  # the previous epoch's first: its checkpoint must be on disk before this one replaces it
        self._pending = self._pool.submit(work)

    def wait(self) -> None:
        """Until the work handed over is done; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.wait()
        except BaseException as failure:
            if error is None:
                raise
            log.warning("the last checkpoint may not have been written (%s: %s)", type(failure).__name__, failure)
        finally:
            self._pool.shutdown()

"""Resumable training state in one file, replaced atomically after every epoch.

It holds what an uninterrupted run would carry from one epoch to the next: the weights, the optimizer's
variables, the noise generator's state, the epoch, the metrics history, the progress grids and the MLflow run id.
Only the training that wrote a checkpoint, interrupted before it finished, may resume it: a fingerprint of the params,
the data and the code guards against resuming another configuration, and a finished training marks its checkpoint
so, which makes any later run (`dvc repro -f`, a changed param that does not enter the fingerprint) start afresh.
A damaged file is never fatal: it is ignored with a warning. `Checkpoint` binds the file to the live model, optimizer
and generator, and puts their variables back as they were when a complete file does not fit them. `Saver` writes
each epoch's file on a thread of its own while the next epoch trains.
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


@dataclass
class TrainingState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)  # one (16, 28, 28) uint8 grid per epoch, from epoch 0
    run_id: str | None = None
    finished: bool = False  # the training completed and wrote its outputs: nothing left to resume


def fingerprint(*parts: object) -> str:
    """A digest of JSON-able configuration and NumPy arrays."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Variables:
    """A training's variables, copied out as arrays: the model's weights, the optimizer's variables (its step count
    among them) and the noise generator's state."""
    model_weights: list[np.ndarray]
    optimizer_variables: list[np.ndarray]
    generator_state: np.ndarray


def save(path: str | Path, key: str, state: TrainingState, variables: Variables) -> None:
    arrays = {
        "fingerprint": np.array(key),
        "epoch": np.array(state.epoch),
        "history": np.array(json.dumps(state.history)),
        "run_id": np.array(state.run_id or ""),
        "finished": np.array(state.finished),
        "grids": np.stack(state.grids),
        "generator_state": variables.generator_state,
    }
    arrays.update({f"model_{i:03d}": weight for i, weight in enumerate(variables.model_weights)})
    arrays.update({f"optimizer_{i:03d}": variable for i, variable in enumerate(variables.optimizer_variables)})
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


@dataclass
class Restored:
    state: TrainingState
    variables: Variables


def restore(path: str | Path, key: str) -> Restored | None:
    """The saved state when it exists and matches `key`; None (start afresh) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["fingerprint"]) != key:
                log.info("%s is from other params, data or code; training starts afresh at epoch 1", path)
                return None
            if bool(archive["finished"]):
                log.info("%s is of a training that finished; this one starts afresh at epoch 1", path)
                return None
            names = sorted(archive.files)
            state = TrainingState(
                epoch=int(archive["epoch"]),
                history=json.loads(str(archive["history"])),
                grids=list(archive["grids"]),
                run_id=str(archive["run_id"]) or None,
            )
            return Restored(state, Variables(
                [archive[name] for name in names if name.startswith("model_")],
                [archive[name] for name in names if name.startswith("optimizer_")],
                archive["generator_state"],
            ))
    except DAMAGED_FILE_ERRORS as error:
        # Only a complete file is ever renamed into place, so this is damage from elsewhere: say so, start afresh.
        log.warning("%s is damaged (%s: %s); ignoring it, training starts afresh at epoch 1", path,
                    type(error).__name__, error)
        return None


class Checkpoint:
    """One training's checkpoint file and the live objects whose variables it saves and restores, in order, under the
    training's fingerprint `key`."""

    def __init__(self, path: Path, key: str, model: "keras.Model", optimizer: "keras.optimizers.Optimizer",
                 generator: "tf.random.Generator"):
        self.path, self.key = Path(path), key
        self.model, self.optimizer, self.generator = model, optimizer, generator

    def variables(self) -> Variables:
        """The current values, copied: they may be saved later, while training goes on."""
        return Variables(self.model.get_weights(), [v.numpy() for v in self.optimizer.variables],
                         self.generator.state.numpy())

    def assign(self, variables: Variables) -> None:
        self.model.set_weights(variables.model_weights)
        for variable, value in zip(self.optimizer.variables, variables.optimizer_variables, strict=True):
            variable.assign(value)
        self.generator.state.assign(variables.generator_state)

    def save(self, state: TrainingState, variables: Variables | None = None) -> None:
        """Write `state` with `variables`, taken earlier, or the current ones."""
        save(self.path, self.key, state, variables or self.variables())

    def restore(self) -> TrainingState | None:
        """The state of the interrupted training this file holds, its variables assigned; None (start afresh, the
        variables untouched) when there is none to resume."""
        restored = restore(self.path, self.key)
        if restored is None:
            return None
        initial = self.variables()
        try:
            self.assign(restored.variables)
        except (ValueError, TypeError) as error:  # arrays of the wrong number or shape: damaged, though whole
            log.warning("%s is damaged (%s); ignoring it, training starts afresh at epoch 1", self.path, error)
            self.assign(initial)
            return None
        log.info("resuming after epoch %d from %s", restored.state.epoch, self.path)
        return restored.state


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

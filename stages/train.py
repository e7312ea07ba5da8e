"""train stage: train the CVAE (resuming an interrupted run), log it to MLflow, write the model and its metrics."""

import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # each epoch's elapsed_seconds counts from here: what the user waits for

# This checkout's code, not whichever copy is installed: a DVC experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cvae_pipeline import tensorflow_runtime
from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.config import load_params
from cvae_pipeline.data import load_prepared

OUTPUTS = ["model", "history", "metrics", "progress", "run", "checkpoint", "settings"]


def main() -> None:
    args = stage_arguments(__doc__, ["prepared", *OUTPUTS])
    params = load_params(args.params)
    tensorflow_runtime.start()  # quietly, with GPU memory that grows
    from cvae_pipeline.training.stage import TrainOutputs, train_and_track  # TensorFlow loads after validation

    data = load_prepared(args.prepared)
    outputs = TrainOutputs(**{name: Path(getattr(args, name)) for name in OUTPUTS})
    train_and_track(params, data, outputs, script=Path(__file__), started=STARTED)


if __name__ == "__main__":
    run_stage("train", main)

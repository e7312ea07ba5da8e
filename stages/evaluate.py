"""evaluate stage: ELBO, IWAE bound, reconstruction quality and active units of the trained model on the test set."""

import sys
from pathlib import Path

# This checkout's code, not whichever copy is installed: a DVC experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cvae_pipeline import tensorflow_runtime
from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.config import load_params
from cvae_pipeline.data import load_prepared
from cvae_pipeline.evaluation.train_outputs import UpstreamOutputs


def main() -> None:
    args = stage_arguments(__doc__, ["prepared", "model", "run", "history", "train_metrics", "metrics"])
    params = load_params(args.params)
    tensorflow_runtime.start()  # quietly, with GPU memory that grows
    from cvae_pipeline.evaluation.stage import evaluate_and_track  # TensorFlow loads after validation

    data = load_prepared(args.prepared)
    upstream = UpstreamOutputs(Path(args.run), Path(args.history), Path(args.train_metrics))
    evaluate_and_track(params, data, Path(args.model), upstream, Path(args.metrics))


if __name__ == "__main__":
    run_stage("evaluate", main)

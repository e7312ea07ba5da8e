"""evaluate stage: ELBO, IWAE bound, reconstruction quality and active units of the trained model on the test set."""

import os
from pathlib import Path

from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.config import load_params
from cvae_pipeline.data import load_prepared
from cvae_pipeline.records import Upstream


def main() -> None:
    args = stage_arguments(__doc__, ["prepared", "model", "run", "history", "train_metrics", "metrics"])
    params = load_params(args.params)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cvae_pipeline.evaluation import evaluate_and_track  # TensorFlow loads after validation

    data = load_prepared(args.prepared)
    upstream = Upstream(Path(args.run), Path(args.history), Path(args.train_metrics))
    evaluate_and_track(params, data.test.images, Path(args.model), upstream, Path(args.metrics))


if __name__ == "__main__":
    run_stage("evaluate", main)

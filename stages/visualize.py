"""visualize stage: reconstructions, prior samples, latent space, training curves and the training animation."""

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
    args = stage_arguments(__doc__, ["prepared", "model", "history", "train_metrics", "metrics", "progress", "run",
                                     "figures"])
    params = load_params(args.params)
    tensorflow_runtime.start()  # quietly, with GPU memory that grows
    from cvae_pipeline.evaluation.figures import draw_all  # TensorFlow loads after validation

    upstream = UpstreamOutputs(Path(args.run), Path(args.history), Path(args.train_metrics), Path(args.metrics))
    draw_all(params, load_prepared(args.prepared), Path(args.model), Path(args.progress), upstream,
             Path(args.figures))


if __name__ == "__main__":
    run_stage("visualize", main)

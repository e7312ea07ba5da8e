"""The train stage's outputs: written whole, or not at all, when the disk is full."""

from types import SimpleNamespace

import numpy as np
import pytest

from cvae_pipeline.errors import DiskFullError
from cvae_pipeline.model.network import build_cvae
from cvae_pipeline.training.checkpoints import Progress
from cvae_pipeline.training.stage import TrainOutputs, write_outputs
from helpers import file_size_limit, model_params

HISTORY = [{"epoch": 1, "train_loss": 100.0, "validation_elbo": -99.0}]


def outputs_in(folder) -> TrainOutputs:
    return TrainOutputs(model=folder / "cvae.keras", history=folder / "history.csv", metrics=folder / "train.json",
                        progress=folder / "progress.npz", run=folder / "run.json", checkpoint=folder / "checkpoint.npz",
                        settings=folder / "settings.json")


def test_a_model_that_does_not_fit_on_the_disk_stops_in_one_line_and_the_previous_model_is_kept(tmp_path):
    outputs = outputs_in(tmp_path)
    trainer = SimpleNamespace(model=build_cvae(model_params(2)))
    progress = Progress(HISTORY, [np.zeros((16, 28, 28), np.uint8)] * 2)
    write_outputs(trainer, progress, {"epochs": 1}, {"precision": "float32"}, outputs)
    before = outputs.model.read_bytes()
    trainer.model.get_layer("encoder").get_layer("encoder_conv_1").kernel.assign_add(1.0)  # a model to tell apart
    with file_size_limit(len(before) // 2), pytest.raises(DiskFullError) as stopped:
        write_outputs(trainer, progress, {"epochs": 2}, {"precision": "float32"}, outputs)
    assert str(stopped.value).startswith(f"{outputs.model}: cannot be written (File too large); the previous "
                                         "cvae.keras is kept as it was")
    assert outputs.model.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["cvae.keras", "history.csv", "train.json", "settings.json", "progress.npz"])  # no temporary left

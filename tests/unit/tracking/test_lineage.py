"""Dataset lineage: each split a stage uses is an input of its run, with DVC's digest, its params and its use."""

import mlflow
import pytest

from cvae_pipeline.config import TrackingParams
from cvae_pipeline.tracking import lineage
from cvae_pipeline.tracking.session import Session
from helpers import params_with


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield Session(TrackingParams(experiment="e", sweep=None, required=True))
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_each_split_is_its_own_input_named_with_its_use_the_files_digest_and_the_data_params(session, tmp_path):
    prepared = tmp_path / "mnist.npz"
    prepared.write_bytes(b"prepared data")
    data = params_with(data={"validation_size": 5000, "validation_seed": 3}).data
    with session.open_run() as run:
        for split in ("train", "validation", "test"):
            lineage.log_dataset(session, prepared, data, split)
    inputs = session.client.get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {found.dataset.name: found for found in inputs}
    assert set(by_name) == {"mnist_binarized/train", "mnist_binarized/validation", "mnist_binarized/test"}
    contexts = {name: {tag.key: tag.value for tag in found.tags}["mlflow.data.context"]
                for name, found in by_name.items()}
    assert contexts == {"mnist_binarized/train": "training", "mnist_binarized/validation": "validation",
                        "mnist_binarized/test": "testing"}
    tags = {tag.key: tag.value for tag in by_name["mnist_binarized/validation"].tags}
    assert tags["dvc_md5"] == lineage.file_md5(prepared) == by_name["mnist_binarized/validation"].dataset.digest
    assert tags["data.validation_size"] == "5000" and tags["data.validation_seed"] == "3"
    assert tags["data.threshold"] == "0.5" and tags["data.train_limit"] == "null"

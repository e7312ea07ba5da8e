"""Reading what train and evaluate left for the later stages: the run reference, the history, the metrics; a missing or
damaged file is one line naming it and the `dvc repro` that writes it again."""

import json
from pathlib import Path

import pytest

from cvae_pipeline.errors import UserInputError
from cvae_pipeline.evaluation.train_outputs import UpstreamOutputs
from cvae_pipeline.tracking import runs


def reference(path: Path) -> UpstreamOutputs:
    """Outputs whose run reference is `path` (the other files are read only by `read`)."""
    return UpstreamOutputs(path, path.with_name("history.csv"), path.with_name("train.json"))


def test_missing_run_reference_says_what_to_run(tmp_path):
    with pytest.raises(UserInputError, match="run `dvc repro train` first"):
        _ = reference(tmp_path / "absent.json").run_id


@pytest.mark.parametrize(("content", "problem"), [('{"run_id": "../../etc"}', "is not a run id"),
                                                   ("{not json", "JSONDecodeError"), ('{"id": "abc"}', "no run_id"),
                                                   ("[1, 2]", "no run_id")])
def test_a_damaged_run_reference_says_so_and_how_to_write_it_again(tmp_path, content, problem):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(UserInputError, match=problem) as stopped:
        _ = reference(tmp_path / "run.json").run_id
    assert "run `dvc repro train` to write it again" in str(stopped.value)


def test_a_run_reference_round_trips_the_run_id(tmp_path):
    class Info:
        run_id, experiment_id = "0123abcd", "7"

    class Run:
        info = Info()

    runs.write_run_reference(tmp_path / "run.json", Run())
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": "0123abcd", "experiment_id": "7"}
    assert reference(tmp_path / "run.json").run_id == "0123abcd"
    runs.write_run_reference(tmp_path / "run.json", None)  # trained without MLflow
    assert reference(tmp_path / "run.json").run_id is None


def outputs(folder: Path, history: str, final: str, metrics: str | None = None) -> UpstreamOutputs:
    (folder / "history.csv").write_text(history)
    (folder / "train.json").write_text(final)
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics)
    return UpstreamOutputs(folder / "run.json", folder / "history.csv", folder / "train.json",
                           folder / "metrics.json" if metrics is not None else None)


HISTORY = "epoch,train_loss,validation_elbo,validation_reconstruction,validation_kl\n1,100,-99,90,9\n2,90,-89,80,9\n"
METRICS = '{"test": {"elbo": -80.0}, "validation": {"elbo": -81.0}}'


def test_train_s_and_evaluate_s_outputs_are_read_and_checked_together(tmp_path):
    history, final, metrics = outputs(tmp_path, HISTORY, '{"epochs": 2, "validation_elbo": -89}', METRICS).read()
    assert history["validation_elbo"].tolist() == [-99, -89] and final["epochs"] == 2
    assert metrics == {"test": {"elbo": -80.0}, "validation": {"elbo": -81.0}}
    tutorial = "epoch,train_loss,test_elbo,test_reconstruction,test_kl\n1,100,-99,90,9\n"  # no validation set
    assert outputs(tmp_path, tutorial, '{"epochs": 1}').read()[0]["test_elbo"].tolist() == [-99]


@pytest.mark.parametrize(("history", "final", "metrics", "problem"), [
    (HISTORY.replace("validation_kl", "kl"), '{"epochs": 2}', None, "history.csv: damaged training history (no column "
                                                                    "validation_kl)"),
    (HISTORY.replace("-89", "-"), '{"epochs": 2}', None, "an empty or non-numeric value"),
    (HISTORY, '{"epochs": 3}', None, "train.json: damaged or out of step with"),
    (HISTORY, '{"epochs": "two"}', None, "train.json: damaged metrics (not a mapping of metric names to numbers)"),
    (HISTORY, '{"epochs": 2}', '{"elbo": -80}', "metrics.json: damaged metrics (not the test and validation"),
])
def test_a_damaged_output_names_its_file_and_the_stage_that_writes_it(tmp_path, history, final, metrics, problem):
    with pytest.raises(UserInputError, match="run `dvc repro") as stopped:
        outputs(tmp_path, history, final, metrics).read()
    assert problem in str(stopped.value)

"""Which run records a stage's work: its source tags, and train's run reference for the later stages."""

import json

import pytest

from cvae_pipeline.errors import UserInputError
from cvae_pipeline.tracking import runs
from helpers import params_with


def test_experiment_tags_name_the_baseline_and_the_sweep(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "hazy-leaf")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef0123456789abcdef01234567")
    tags = runs.source_tags(params_with())
    assert tags["dvc_experiment"] == "hazy-leaf"
    assert tags["dvc_baseline"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["sweep"] == "0123456"  # by default, every experiment of one commit
    assert runs.source_tags(params_with(tracking={"sweep": "latent"}))["sweep"] == "latent"
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert "sweep" not in runs.source_tags(params_with())


def test_missing_run_reference_says_what_to_run(tmp_path):
    with pytest.raises(UserInputError, match="run `dvc repro train` first"):
        runs.read_run_id(tmp_path / "absent.json")


@pytest.mark.parametrize(("content", "problem"), [('{"run_id": "../../etc"}', "is not a run id"),
                                                   ("{not json", "JSONDecodeError"), ('{"id": "abc"}', "KeyError")])
def test_a_damaged_run_reference_says_so_and_how_to_write_it_again(tmp_path, content, problem):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(UserInputError, match=problem) as stopped:
        runs.read_run_id(tmp_path / "run.json")
    assert "run `dvc repro train` to write it again" in str(stopped.value)


def test_a_run_reference_round_trips_the_run_id(tmp_path):
    class Info:
        run_id, experiment_id = "0123abcd", "7"

    class Run:
        info = Info()

    runs.write_run_reference(tmp_path / "run.json", Run())
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": "0123abcd", "experiment_id": "7"}
    assert runs.read_run_id(tmp_path / "run.json") == "0123abcd"
    runs.write_run_reference(tmp_path / "run.json", None)  # trained without MLflow
    assert runs.read_run_id(tmp_path / "run.json") is None

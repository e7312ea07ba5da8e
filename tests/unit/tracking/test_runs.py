"""Which run records a stage's work: its source tags. Train's run reference is read by evaluation/train_outputs.py
(tests/unit/evaluation/test_train_outputs.py)."""


import json

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


def test_a_search_trials_stage_takes_its_run_name_and_tags_from_the_search(monkeypatch):
    for name in (runs.EXPERIMENT_NAME_ENV, runs.BASELINE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert runs.run_name("train").startswith("train-")
    tags = {"study": "recipe", "trial": "7", "machine": "vm", "mlflow.parentRunId": "abc", "study_run_id": "abc"}
    monkeypatch.setenv(runs.TRIAL_ENV, json.dumps({"name": "recipe-trial-7", "tags": tags}))
    assert runs.run_name("train") == "recipe-trial-7"
    assert runs.source_tags(params_with()).items() >= tags.items()  # nested under the study's run

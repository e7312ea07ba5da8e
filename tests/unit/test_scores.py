"""The names of the splits and scores: dvc.yaml's plots and the committed reports spell them as `scores` does."""

import csv
import json

import yaml

from cvae_pipeline import scores
from helpers import REPO


def plotted_history_columns() -> list[str]:
    """Every column of train's history that a plot of dvc.yaml draws."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    history = pipeline["vars"][0]["paths"]["train_history"]
    columns = []
    for plot in pipeline["plots"]:
        for definition in plot.values() if isinstance(plot, dict) else []:
            found = definition["y"].get(history, [])
            columns += [found] if isinstance(found, str) else found
    return columns


def test_dvc_yaml_plots_the_validation_scores_and_the_training_loss_by_their_names():
    plotted = plotted_history_columns()
    assert [column for column in plotted if column.startswith(f"{scores.VALIDATION}_")] == list(
        scores.epoch_columns(scores.VALIDATION))
    assert scores.TRAIN_LOSS in plotted
    header = next(csv.reader((REPO / "reports/train_history.csv").open()))
    assert set(plotted) <= set(header)  # a plot of a column that train no longer writes would be empty


def test_the_committed_reports_use_the_names_of_scores():
    header = next(csv.reader((REPO / "reports/train_history.csv").open()))
    split = scores.scored_split(header)
    assert {scores.TRAIN_LOSS, *scores.epoch_columns(split)} <= set(header)
    assert not [column for column in header if column.startswith(f"{scores.TEST}_") and split != scores.TEST]
    final = json.loads((REPO / "reports/train_metrics.json").read_text())
    assert {scores.TRAIN_LOSS, *scores.epoch_columns(split)} <= set(final)
    evaluated = json.loads((REPO / "reports/metrics.json").read_text())
    assert set(evaluated) <= set(scores.SPLITS) and scores.TEST in evaluated
    assert all(set(found) == set(scores.EVALUATED) for found in evaluated.values())


def test_each_place_a_score_is_recorded_names_it_after_its_split():
    assert scores.epoch_columns("validation") == ("validation_elbo", "validation_reconstruction", "validation_kl")
    assert scores.scored_split(["epoch", "test_elbo"]) == "test"
    assert scores.final(scores.per_epoch(scores.VALIDATION)) == "final_validation_elbo"
    assert scores.evaluated(scores.TEST, scores.IWAE) == "eval_test_iwae"
    assert scores.experiment_column(scores.VALIDATION) == "validation.elbo"

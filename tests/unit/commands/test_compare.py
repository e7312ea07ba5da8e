"""The experiments table: params as params.yaml spells them, every metric numeric, best validation ELBO first."""

import math

from cvae_pipeline.commands.compare import experiments_table, markdown


def row(name, learning_rate, elbo, test_elbo=None, **metrics):
    """One experiment as `dvc.api.exp_show` gives it: evaluate's metrics per split (`validation.elbo`)."""
    test_elbo = elbo - 1 if test_elbo is None else test_elbo
    return {"Experiment": name, "rev": name[:7], "typ": "branch_commit", "Created": "01:05 AM", "State": "Success",
            "Executor": "dvc-task", "train.learning_rate": learning_rate, "model.latent_dim": 50.0,
            "validation.elbo": elbo, "validation.iwae": elbo + 7, "validation.kl": 35.0, "validation.iwae_k": 100,
            "test.elbo": test_elbo, "test.iwae": test_elbo + 7, "test.kl": 35.0, "test.iwae_k": 100, **metrics}


def test_a_metric_that_some_rows_lack_stays_a_numeric_column():
    rows = [row("older", 2e-3, -76.8),  # a commit from before the metric existed: DVC gives None
            row("quick", 4e-3, -75.2, epoch_to_quality=14.0, seconds_to_quality=217.1),
            row("slow", 1e-3, -78.4, epoch_to_quality=None, seconds_to_quality=None),  # never reached it
            {"Experiment": None, "rev": "workspace", "test.elbo": -1.0}]
    table = experiments_table(rows)
    assert list(table["experiment"]) == ["quick", "older", "slow"]  # best first; the workspace left out
    assert table["epoch_to_quality"].tolist()[0] == 14 and math.isnan(table["epoch_to_quality"].tolist()[2])
    assert list(table["model.latent_dim"]) == [50, 50, 50]
    text = markdown(table)
    assert "seconds_to_quality" in text and "217.1" in text


def test_experiments_are_ranked_by_the_validation_set_and_the_test_set_is_left_out_of_the_summary():
    rows = [row("by-test", 1e-3, elbo=-76.0, test_elbo=-74.0), row("by-validation", 2e-3, elbo=-75.0, test_elbo=-75.5)]
    table = experiments_table(rows)
    assert list(table["experiment"]) == ["by-validation", "by-test"]
    assert table["test.elbo"].tolist() == [-75.5, -74.0]  # kept in the CSV, for the final report
    text = markdown(table)
    assert text.startswith("# Experiments, best validation ELBO first") and "test.elbo" not in text


def test_without_a_validation_set_the_test_set_ranks_them_and_the_table_says_so():
    rows = [{key: value for key, value in row(name, rate, -70.0, test_elbo=elbo).items()
             if not key.startswith("validation.")} for name, rate, elbo in (("a", 1e-3, -77.0), ("b", 2e-3, -76.0))]
    table = experiments_table(rows)
    assert list(table["experiment"]) == ["b", "a"]
    assert "No experiment has a validation set" in markdown(table)

"""The experiments table: params as params.yaml spells them, every metric numeric, best test ELBO first."""

import math

from cvae_pipeline.commands.compare import experiments_table, markdown


def row(name, learning_rate, elbo, **metrics):
    return {"Experiment": name, "rev": name[:7], "typ": "branch_commit", "Created": "01:05 AM", "State": "Success",
            "Executor": "dvc-task", "train.learning_rate": learning_rate, "model.latent_dim": 50.0, "elbo": elbo,
            "iwae": elbo + 7, "kl": 35.0, **metrics}


def test_a_metric_that_some_rows_lack_stays_a_numeric_column():
    rows = [row("older", 2e-3, -76.8),  # a commit from before the metric existed: DVC gives None
            row("quick", 4e-3, -75.2, epoch_to_quality=14.0, seconds_to_quality=217.1),
            row("slow", 1e-3, -78.4, epoch_to_quality=None, seconds_to_quality=None),  # never reached it
            {"Experiment": None, "rev": "workspace", "elbo": -1.0}]
    table = experiments_table(rows)
    assert list(table["experiment"]) == ["quick", "older", "slow"]  # best first; the workspace left out
    assert table["epoch_to_quality"].tolist()[0] == 14 and math.isnan(table["epoch_to_quality"].tolist()[2])
    assert list(table["model.latent_dim"]) == [50, 50, 50]
    text = markdown(table)
    assert "seconds_to_quality" in text and "217.1" in text

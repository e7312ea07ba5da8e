"""What a study reports: its trials ranked (complete first, best first), the counts and the reasons of the pruned and
failed ones, the best trial and the command that runs it at the full budget, the figures; with two objectives, the
Pareto front of quality against training time, and that pruning does not apply."""

import optuna
import pandas as pd
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cvae_pipeline.tuning.report import best_trials, trials_table, write_report
from cvae_pipeline.tuning.space import parse_search
from cvae_pipeline.tuning.storage import REASON_ATTR
from helpers import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SPACE = {"train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
         "train.ema_momentum": {"choices": [0, 0.99]}}
DISTRIBUTIONS = {"train.learning_rate": FloatDistribution(1e-3, 1e-2, log=True),
                 "train.ema_momentum": CategoricalDistribution([0, 0.99])}


def search_of(objectives):
    return parse_search(yaml.safe_dump({"study": "r", "objectives": objectives, "trials": 8,
                                        "fixed": {"train.epochs": 3}, "space": SPACE}), BASE)


def add(study, number, state, values=None, reason="", epochs=3):
    params = {"train.learning_rate": 1e-3 * (1 + number), "train.ema_momentum": [0, 0.99][number % 2]}
    study.add_trial(create_trial(state=state, params=params, distributions=DISTRIBUTIONS, values=values,
                                 intermediate_values={epoch: -150.0 + 10 * epoch + number for epoch in
                                                      range(1, epochs + 1)},
                                 user_attrs={"host": "vm", REASON_ATTR: reason}))


def one_objective_study():
    study = optuna.create_study(direction="maximize")
    add(study, 0, TrialState.COMPLETE, [-90.0])
    add(study, 1, TrialState.COMPLETE, [-85.0])
    add(study, 2, TrialState.PRUNED, None, "pruned after epoch 1: validation ELBO -139.00, below the median", 1)
    add(study, 3, TrialState.FAIL, None, "train: the loss became NaN at epoch 1: lower train.learning_rate", 0)
    add(study, 4, TrialState.COMPLETE, [-88.0])
    return study


def test_the_table_ranks_complete_trials_best_first_then_the_others_with_their_reasons():
    table = trials_table(one_objective_study(), search_of(["validation_elbo"]))
    assert list(table["trial"]) == [1, 4, 0, 2, 3]
    assert list(table["state"]) == ["complete", "complete", "complete", "pruned", "failed"]
    assert table.loc[4, "reason"].startswith("train: the loss became NaN")
    assert list(table.columns[:3]) == ["trial", "state", "validation_elbo"] and "train.learning_rate" in table
    assert table.loc[0, "epochs"] == 3 and table.loc[3, "epochs"] == 1


def test_the_report_counts_names_the_best_and_how_to_run_it_and_draws_the_figures(tmp_path):
    files = write_report(one_objective_study(), search_of(["validation_elbo"]), tmp_path, ".tune/optuna.journal", 8)
    text = (tmp_path / "reports/tune.md").read_text()
    assert "Trials: 5 of 8: 3 complete, 1 pruned, 1 failed" in text
    assert "- trial 3 failed: train: the loss became NaN at epoch 1" in text
    assert "## Best" in text and "- trial 1: validation_elbo -85.00" in text and "`make tune-apply TRIAL=1`" in text
    assert "`train.epochs: 3`" in text and "`train.learning_rate`: 0.001 to 0.01, log scale" in text
    csv = pd.read_csv(tmp_path / "reports/tune/trials.csv")
    assert list(csv["trial"]) == [1, 4, 0, 2, 3]
    pictures = {path.name for path in files if path.suffix == ".png"}
    assert pictures == {"optimization_history.png", "param_importances.png", "parallel_coordinates.png",
                        "learning_curves.png"}
    for name in pictures:
        assert (tmp_path / "reports/tune" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](tune/{name})" in text


def test_two_objectives_give_the_pareto_front_of_quality_against_time_without_pruning(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0, TrialState.COMPLETE, [-90.0, 100.0])
    add(study, 1, TrialState.COMPLETE, [-85.0, 200.0])
    add(study, 2, TrialState.COMPLETE, [-95.0, 300.0])  # worse and slower than trial 0: not on the front
    add(study, 3, TrialState.COMPLETE, [-99.0, 50.0])
    search = search_of(["validation_elbo", "train_seconds"])
    assert sorted(trial.number for trial in best_trials(study)) == [0, 1, 3]
    files = write_report(study, search, tmp_path, ".tune/optuna.journal", 4)
    text = (tmp_path / "reports/tune.md").read_text()
    assert "## Pareto front (quality against training time)" in text
    assert "pruning does not apply to two objectives" in text
    assert "- trial 2" not in text.split("## Trials")[0]
    assert (tmp_path / "reports/tune/pareto_front.png") in files


def test_a_pareto_front_of_one_trial_is_still_reported_as_the_front(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, 0, TrialState.COMPLETE, [-85.0, 100.0])
    add(study, 1, TrialState.COMPLETE, [-90.0, 200.0])  # worse and slower: trial 0 alone is the front
    write_report(study, search_of(["validation_elbo", "train_seconds"]), tmp_path, ".tune/optuna.journal", 2)
    text = (tmp_path / "reports/tune.md").read_text()
    assert "## Pareto front (quality against training time)" in text and "## Best" not in text
    assert "- trial 0: validation_elbo -85.00, train_seconds 100.00" in text


def test_a_study_without_a_complete_trial_still_reports(tmp_path):
    study = optuna.create_study(direction="maximize")
    add(study, 0, TrialState.FAIL, None, "train: the loss became NaN at epoch 1", 0)
    files = write_report(study, search_of(["validation_elbo"]), tmp_path, ".tune/optuna.journal", 8)
    text = files[0].read_text()
    assert "0 complete, 0 pruned, 1 failed" in text and "## Best" not in text

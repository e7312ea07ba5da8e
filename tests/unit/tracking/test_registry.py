"""Promotion: the finished run with the best validation ELBO and a model becomes the champion; the test set never
chooses."""

import mlflow
import pytest

from cvae_pipeline.config import TrackingParams
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.tracking import registry
from cvae_pipeline.tracking.session import Session

CFG = TrackingParams(experiment="e", sweep=None, required=True)


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield Session(CFG)
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def evaluated_run(session: Session, name: str, **metrics: float) -> str:
    """A finished run with evaluate's metrics (`test`, `validation`: their ELBO) and a complete logged model."""
    client, experiment = session.client, session.experiment_id()
    run_id = client.create_run(experiment, run_name=name).info.run_id
    for split, elbo in metrics.items():
        client.log_metric(run_id, f"eval_{split}_elbo", elbo)
    model = client.create_logged_model(experiment, name="model", source_run_id=run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_the_champion_is_the_best_by_validation_even_where_the_test_set_would_pick_another(session):
    evaluated_run(session, "best-on-test", validation=-76.0, test=-74.0)
    chosen = evaluated_run(session, "best-on-validation", validation=-75.0, test=-75.5)
    evaluated_run(session, "tutorial", test=-73.0)  # data.validation_size 0: nothing unbiased to choose it by
    said = registry.promote(session, "cvae")
    assert f"from run best-on-validation ({chosen})" in said and "the best of 2 finished run(s)" in said
    champion = session.client.get_model_version_by_alias("cvae", registry.ALIAS)
    assert champion.tags["run_id"] == chosen and champion.tags["eval_validation_elbo"] == "-75"
    assert "already version 1" in registry.promote(session, "cvae")  # the same best: no second version


def test_no_run_with_a_validation_score_is_refused_in_one_line_saying_what_to_run(session):
    evaluated_run(session, "tutorial", test=-73.0)
    with pytest.raises(UserInputError, match=r"has evaluate's eval_validation_elbo and a logged model: run `make "
                                             r"repro` \(or a sweep\) first, with a validation set"):
        registry.promote(session, "cvae")

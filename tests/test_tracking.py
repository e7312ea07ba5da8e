"""MLflow plumbing: where the store is, how params are flattened, and how runs end."""

import contextlib

import mlflow
import pytest
import yaml

from conftest import REPO, params_with
from cvae_pipeline import tracking


def test_repository_root_of_a_dvc_experiment_copy_is_the_main_repository(tmp_path):
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12cd34"
    copy.mkdir(parents=True)
    assert tracking.repository_root(copy) == tmp_path / "project"
    assert tracking.repository_root(tmp_path / "project") == tmp_path / "project"


def test_default_store_is_sqlite_at_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_params_are_flattened_as_params_yaml_spells_them():
    flat = tracking.flatten(params_with(train={"batch_size": 64}))
    assert flat["train.batch_size"] == "64"
    assert flat["data.train_limit"] == "null"
    assert flat["train.jit_compile"] == "false"
    assert flat["model.encoder_filters"] == "[32, 64]"
    assert flat["train.kl"] == "analytic"
    assert flat["seed"] == "0"
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    assert len(flat) == sum(len(section) for section in shipped.values() if isinstance(section, dict)) + 1  # + seed


def test_experiment_tags_name_the_baseline_and_the_sweep(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "hazy-leaf")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef0123456789abcdef01234567")
    tags = tracking.source_tags(params_with())
    assert tags["dvc_experiment"] == "hazy-leaf"
    assert tags["dvc_baseline"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["sweep"] == "0123456"  # by default, every experiment of one commit
    assert tracking.source_tags(params_with(tracking={"sweep": "latent"}))["sweep"] == "latent"
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert "sweep" not in tracking.source_tags(params_with())


def test_dvc_root_names_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def status_of(run_id):
    return mlflow.MlflowClient().get_run(run_id).info.status


def test_experiment_is_created_once_for_model_training_with_artifacts_in_the_main_repository(store, monkeypatch):
    copy = store / ".dvc" / "tmp" / "exps" / "tmp1"  # as `dvc exp run --queue` runs a stage
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    first = tracking.ensure_experiment("sweep")
    assert tracking.ensure_experiment("sweep") == first
    experiment = mlflow.MlflowClient().get_experiment(first)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.removeprefix("file://").startswith(str(store / "mlruns"))
    assert (store / "mlflow.db").exists() and not (copy / "mlflow.db").exists()


@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"),
                                                 (KeyboardInterrupt, "KILLED")])
def test_a_run_never_stays_running(store, raised, status):
    expected = pytest.raises(raised) if raised else contextlib.nullcontext()
    with expected, tracking.active_run("e", tags={"k": "v"}) as run:
        run_id = run.info.run_id
        if raised:
            raise raised
    assert status_of(run_id) == status
    assert mlflow.MlflowClient().get_run(run_id).data.tags["k"] == "v"


def test_a_run_reopened_by_id_continues_and_ends_finished(store):
    with pytest.raises(KeyboardInterrupt), tracking.active_run("e") as run:
        tracking.log_metrics({"loss": 2.0}, step=1)
        raise KeyboardInterrupt
    with tracking.active_run("e", run_id=run.info.run_id) as again:
        tracking.log_metrics({"loss": 1.0}, step=2)
    assert again.info.run_id == run.info.run_id
    assert status_of(run.info.run_id) == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_mlflow_run_id_from_the_environment_is_ignored(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with tracking.active_run("e") as run:
        assert run.info.run_id != "0123456789abcdef"


def test_missing_run_reference_says_what_to_run(tmp_path):
    with pytest.raises(tracking.UserInputError, match="run `dvc repro train` first"):
        tracking.read_run_id(tmp_path / "absent.json")

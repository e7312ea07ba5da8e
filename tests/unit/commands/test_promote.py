"""`make promote`'s command: the experiment, the registered name and the sweep it promotes from come from its params
file and `--sweep`; it needs the store whatever tracking.required says; its failures are one line. Which run is best
is test_registry.py's."""

import socket
import sys

import mlflow
import pytest
import yaml

from cvae_pipeline.cli import stage_status
from cvae_pipeline.commands import promote
from helpers import REPO


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The working directory, tmp_path, with a params file naming experiment `e` and registered model `cvae`: the
    default store is its mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tmp_path / "params.yaml")
    yield tmp_path
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def store(folder):
    """A client of the folder's store."""
    return mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def write_params(path, required: bool = True):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"].update(experiment="e", required=required)
    raw["registry"]["model_name"] = "cvae"
    path.write_text(yaml.safe_dump(raw))


def evaluated_run(client, name: str, validation_elbo: float, sweep: str | None = None) -> str:
    """A finished run of experiment `e` with evaluate's validation ELBO and a complete logged model."""
    experiment = client.get_experiment_by_name("e") or client.get_experiment(client.create_experiment("e"))
    run_id = client.create_run(experiment.experiment_id, run_name=name,
                               tags={"sweep": sweep} if sweep else None).info.run_id
    client.log_metric(run_id, "eval_validation_elbo", validation_elbo)
    model = client.create_logged_model(experiment.experiment_id, name="model", source_run_id=run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def promote_with(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m cvae_pipeline.commands.promote ARGS`: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["promote", *args])
    status = stage_status("promote", promote.main)
    out, err = capsys.readouterr()
    return status, out, err


def test_the_best_run_of_the_params_experiment_or_of_one_sweep_becomes_the_registered_models_champion(
        store, monkeypatch, capsys):
    best = evaluated_run(store, "best", -75.0)
    in_sweep = evaluated_run(store, "best-of-sweep", -76.0, sweep="latent")
    evaluated_run(store, "other-of-sweep", -77.0, sweep="latent")
    status, out, _ = promote_with(monkeypatch, capsys, "--sweep", "latent")
    assert status == 0
    assert out.startswith(f"registered cvae version 1 from run best-of-sweep ({in_sweep}): ")
    assert "the best of 2 finished run(s) with an evaluation in experiment e, sweep latent" in out
    assert out.endswith("cvae@champion -> version 1\n")
    status, out, _ = promote_with(monkeypatch, capsys)  # the whole experiment
    assert status == 0 and out.startswith(f"registered cvae version 2 from run best ({best}): ")
    assert store.get_model_version_by_alias("cvae", "champion").tags["run_id"] == best

    status, out, err = promote_with(monkeypatch, capsys, "--sweep", "no-such-sweep")
    assert (status, out) == (1, "")
    assert err.startswith("no finished run in experiment e, sweep no-such-sweep has evaluate's eval_validation_elbo")
    assert err.count("\n") == 1


def test_a_missing_params_file_or_a_store_that_does_not_answer_is_one_line_even_where_the_params_do_not_need_it(
        folder, monkeypatch, capsys):
    status, out, err = promote_with(monkeypatch, capsys, "--params", "absent.yaml")
    assert (status, out, err) == (2, "", "absent.yaml: file not found; run from the repository root or pass its path\n")
    write_params(folder / "params.yaml", required=False)  # the stages would train without MLflow: promote cannot
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{probe.getsockname()[1]}")
    status, out, err = promote_with(monkeypatch, capsys)
    assert (status, out) == (1, "")
    assert err.startswith("MLflow tracking server http://127.0.0.1:") and "does not answer" in err
    assert err.count("\n") == 1

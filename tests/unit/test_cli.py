"""What every stage script shares: a user's mistake is one line on stderr and its exit status, never a traceback."""

import sys

import pytest

from cvae_pipeline.cli import run_stage, stage_arguments
from cvae_pipeline.errors import DataError, ParamsError


@pytest.mark.parametrize(("error", "status"), [(ParamsError("params.yaml: seed must be\nan integer"), 2),
                                                (DataError("data/raw/x: truncated"), 1)])
def test_a_user_error_is_one_line_and_its_exit_status(capsys, error, status):
    def main():
        raise error

    with pytest.raises(SystemExit) as exited:
        run_stage("train", main)
    assert exited.value.code == status
    assert capsys.readouterr().err == str(error).replace("\n", " ") + "\n"


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_stage("evaluate", main)
    assert exited.value.code == 130 and capsys.readouterr().err == "evaluate: interrupted\n"


def test_a_bug_is_not_hidden(capsys):
    def main():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage("train", main)


def test_stage_arguments_are_the_params_file_and_the_paths_dvc_yaml_passes(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--prepared", "data/p.npz", "--train-metrics", "m.json"])
    args = stage_arguments("train", ["prepared", "train_metrics"])
    assert (args.params, args.prepared, args.train_metrics) == ("params.yaml", "data/p.npz", "m.json")
    monkeypatch.setattr(sys, "argv", ["train.py", "--prepared", "data/p.npz"])
    with pytest.raises(SystemExit):  # a path dvc.yaml must pass is missing: argparse's own usage line
        stage_arguments("train", ["prepared", "train_metrics"])

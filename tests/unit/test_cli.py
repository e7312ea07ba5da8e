"""What every stage script shares: a user's mistake is one line on stderr and its exit status, never a traceback; the
process then ends without Python's teardown, once what Python would wait for has run."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvae_pipeline.cli import stage_arguments, stage_status
from cvae_pipeline.errors import DataError, ParamsError

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize(("error", "status"), [(ParamsError("params.yaml: seed must be\nan integer"), 2),
                                                (DataError("data/raw/x: truncated"), 1)])
def test_a_user_error_is_one_line_and_its_exit_status(capsys, error, status):
    def main():
        raise error

    assert stage_status("train", main) == status
    assert capsys.readouterr().err == str(error).replace("\n", " ") + "\n"


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def main():
        raise KeyboardInterrupt

    assert stage_status("evaluate", main) == 130 and capsys.readouterr().err == "evaluate: interrupted\n"


def test_a_bug_is_not_hidden(capsys):
    def main():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        stage_status("train", main)


def test_stage_arguments_are_the_params_file_and_the_paths_dvc_yaml_passes(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--prepared", "data/p.npz", "--train-metrics", "m.json"])
    args = stage_arguments("train", ["prepared", "train_metrics"])
    assert (args.params, args.prepared, args.train_metrics) == ("params.yaml", "data/p.npz", "m.json")
    monkeypatch.setattr(sys, "argv", ["train.py", "--prepared", "data/p.npz"])
    with pytest.raises(SystemExit):  # a path dvc.yaml must pass is missing: argparse's own usage line
        stage_arguments("train", ["prepared", "train_metrics"])


# A stage script: its output unflushed, an atexit handler, an object whose finalizer only Python's teardown calls, and
# (with an argument) a thread still writing when main returns or a user error.
STAGE = """
import atexit, sys, threading, time
from pathlib import Path
from cvae_pipeline.cli import run_stage
from cvae_pipeline.errors import ParamsError

folder = Path(sys.argv[1])

class TornDown:
    def __del__(self):
        (folder / "torn-down").touch()

kept = TornDown()
atexit.register(lambda: (folder / "atexit").touch())

def late_write():
    time.sleep(0.5)
    (folder / "thread").touch()

def main():
    print("all of it", end="")
    if "thread" in sys.argv:
        threading.Thread(target=late_write).start()
    if "error" in sys.argv:
        raise ParamsError("params.yaml: train.epochs must be a positive integer")

run_stage("train", main)
"""


def run_script(folder: Path, *args: str, script: str = STAGE) -> subprocess.CompletedProcess:
    """`script` run as a stage script in a process of its own, with the folder and `args` as its arguments."""
    (folder / "stage.py").write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, folder / "stage.py", folder, *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}, check=False)


def test_a_stage_ends_without_teardown_after_its_atexit_handlers_with_its_output_whole(tmp_path):
    done = run_script(tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "all of it", "")
    assert (tmp_path / "atexit").exists()
    assert not (tmp_path / "torn-down").exists()  # Python's teardown, which would call the finalizer, was skipped


def test_a_stage_with_a_user_error_ends_with_its_status_and_one_line(tmp_path):
    done = run_script(tmp_path, "error")
    assert (done.returncode, done.stderr) == (2, "params.yaml: train.epochs must be a positive integer\n")
    assert (tmp_path / "atexit").exists() and not (tmp_path / "torn-down").exists()


def test_keras_loads_in_a_stage_while_scikit_learn_stays_out(tmp_path):
    done = run_script(tmp_path, script="""
        import sys
        from cvae_pipeline.cli import run_stage

        def main():
            import keras  # which imports scikit-learn for its wrappers when it may
            print(keras.layers.Dense(1).name, "sklearn" in sys.modules and sys.modules["sklearn"] is not None)
            import sklearn

        run_stage("train", main)
    """)
    assert done.stdout.startswith("dense False"), done.stderr[-2000:]
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr  # a bug's traceback, as it is


def test_a_thread_still_at_work_is_waited_for(tmp_path):
    done = run_script(tmp_path, "thread")
    assert (done.returncode, done.stdout) == (0, "all of it")
    assert (tmp_path / "thread").exists() and (tmp_path / "atexit").exists()

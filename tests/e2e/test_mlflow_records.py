"""Records you can trust, end to end: a rerun really retrains, every execution is its own complete MLflow run, each
epoch and model is logged once, unknown run ids and damaged files are handled in one line."""

import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers import run, run_record
from repositories import (
    TINY,
    commit_all,
    copy_repository,
    kill_training_once_checkpointed,
    run_queue,
    runs_in,
    setup_copy,
    snapshot,
    stage_commands,
)

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
FIGURES = {f"figures/{name}" for name in ("reconstructions.png", "prior_samples.png", "latent_scatter.png",
                                           "training_curves.png", "training_progress.gif", "latent_manifold.png")}


def steps(run_id: str, key: str = "validation_elbo") -> list[int]:
    """Every point logged for `key`, duplicates included."""
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def models_of(run_id: str) -> list:
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                       output_format="list")


def run_named(runs: pd.DataFrame, name: str) -> pd.Series:
    found = runs[runs["tags.mlflow.runName"] == name]
    assert len(found) == 1, (name, runs["tags.mlflow.runName"].tolist())
    return found.iloc[0]


# --- 1. a rerun retrains -------------------------------------------------------------------------------------------

def test_a_code_change_a_forced_run_or_a_tracking_only_experiment_trains_from_epoch_1_in_a_new_run(ran_pipeline):
    repo_copy, env = ran_pipeline
    commit_all(repo_copy, "trained")
    original = runs_in(repo_copy).iloc[0]["run_id"]
    before = run_record(original)

    # Code that only evaluate, visualize, serving or MLflow's logging run: train is not re-run.
    for module in ("evaluation/stage.py", "evaluation/figures.py", "tracking/logged_model.py", "tracking/session.py"):
        with open(repo_copy / "src/cvae_pipeline" / module, "a") as changed:
            changed.write("\n# a change to code train does not depend on\n")
    unchanged = run(["dvc", "repro", "train"], repo_copy, **env)
    assert unchanged.returncode == 0 and "Stage 'train' didn't change, skipping" in unchanged.stdout, unchanged.stdout
    with open(repo_copy / "src/cvae_pipeline/model/losses.py", "a") as module:
        module.write("\n# a change to the code that train runs\n")
    changed = run(["dvc", "repro", "train"], repo_copy, **env)
    forced = run(["dvc", "repro", "-f", "train"], repo_copy, **env)
    commit_all(repo_copy, "code changed")
    experiment = run(["dvc", "exp", "run", "-S", "tracking.sweep=tracking-only"], repo_copy, **env)
    for result, why in ((changed, "is from other params, data or code"), (forced, "of a training that finished"),
                        (experiment, "of a training that finished")):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming" not in result.stderr
        assert "train: epoch 1/2" in result.stderr and why in result.stderr

    runs = runs_in(repo_copy)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    assert runs["tags.mlflow.runName"].nunique() == 4  # told apart by name in the runs table
    name = re.search(r"Ran experiment\(s\): (\S+)", experiment.stdout).group(1)
    assert run_named(runs, name)["params.tracking.sweep"] == "tracking-only"
    for run_id in runs["run_id"]:
        assert steps(run_id) == [1, 2] and steps(run_id, "final_validation_elbo") == [0]
        assert len(models_of(run_id)) == 1
    assert run_record(original) == before  # the first training's run is left exactly as it was


def test_an_interrupted_training_whose_code_changed_starts_afresh_in_a_new_run(repo_copy, fake_mnist):
    env = setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    kill_training_once_checkpointed(repo_copy, **env)
    assert int(np.load(repo_copy / "models/checkpoint.npz")["epoch"]) >= 1
    with open(repo_copy / "src/cvae_pipeline/model/optimization.py", "a") as module:  # imported through the loop
        module.write("\n# a change to the code that train runs\n")
    result = run(["dvc", "repro", "train"], repo_copy, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" not in result.stderr and "is from other params, data or code" in result.stderr
    runs = runs_in(repo_copy)
    assert len(runs) == 2 and set(runs["status"]) == {"KILLED", "FINISHED"}
    assert steps(runs[runs["status"] == "FINISHED"].iloc[0]["run_id"]) == [1, 2, 3]


def test_every_training_outside_an_experiment_gets_a_name_of_its_own(ran_pipeline):
    repo_copy, env = ran_pipeline  # one training done
    assert run(["dvc", "repro", "-f", "train"], repo_copy, **env).returncode == 0
    names = runs_in(repo_copy)["tags.mlflow.runName"].tolist()
    assert len(set(names)) == 2 and all(re.fullmatch(r"train-[0-9a-f]{7}-\d{8}-\d{6}", n) for n in names), names


# --- 2. every execution is a complete run ----------------------------------------------------------------------------

def test_experiments_on_evaluate_or_visualize_params_alone_get_complete_runs_of_their_own(ran_pipeline):
    repo_copy, env = ran_pipeline
    commit_all(repo_copy, "baseline")
    baseline = runs_in(repo_copy).iloc[0]
    before = run_record(baseline["run_id"])

    queued = run(["dvc", "exp", "run", "--queue", "-S", "evaluate.iwae_k=7,9"], repo_copy, **env)
    assert queued.returncode == 0, queued.stderr
    assert run_queue(repo_copy, tasks=2, jobs=2, **env) == ["Success"] * 2  # the two race on nothing
    visual = run(["dvc", "exp", "run", "-S", "visualize.examples=5"], repo_copy, **env)
    assert visual.returncode == 0, visual.stderr[-3000:]
    assert "Running stage 'train'" not in visual.stdout

    assert run_record(baseline["run_id"]) == before  # left exactly as it was
    names = run(["dvc", "exp", "list", "--name-only"], repo_copy).stdout.split()
    runs = runs_in(repo_copy)
    assert len(names) == 3 and len(runs) == 4
    client = mlflow.MlflowClient()
    for name in names:
        found = run_named(runs, name)
        assert found["status"] == "FINISHED" and found["tags.dvc_experiment"] == name
        assert found["tags.training_run_id"] == baseline["run_id"]
        assert found["tags.training_model_uri"] == models_of(baseline["run_id"])[0].model_uri
        # every param as used, the training's curves and final metrics, evaluation metrics and figures
        assert {key for key in found.index if key.startswith("params.")} == {
            key for key in baseline.index if key.startswith("params.")}
        assert steps(found["run_id"]) == [1, 2] and steps(found["run_id"], "train_loss") == [1, 2]
        assert found["metrics.final_validation_elbo"] == baseline["metrics.final_validation_elbo"]
        assert {a.path for a in client.list_artifacts(found["run_id"], "figures")} == FIGURES
        assert len(models_of(found["run_id"])) == 0  # linked, not copied
        for key in ("eval_test_elbo", "eval_test_iwae", "eval_test_iwae_k"):
            assert steps(found["run_id"], key) == [0]
        iwae_k = int(found["params.evaluate.iwae_k"])
        assert found["metrics.eval_test_iwae_k"] == iwae_k
    by_value = {int(run_named(runs, name)["params.evaluate.iwae_k"]) for name in names}
    assert by_value == {5, 7, 9}
    visual_run = runs[runs["params.visualize.examples"] == "5"].iloc[0]
    # evaluate did not run: the metrics are its earlier ones
    assert visual_run["metrics.eval_test_elbo"] == baseline["metrics.eval_test_elbo"]

    # Later executions in the workspace that reuse the training: each its own run, never one of the runs before.
    records_before = {run_id: run_record(run_id) for run_id in runs["run_id"]}
    for module in ("evaluation/figures.py", "evaluation/stage.py"):  # visualize alone, then evaluate (and visualize)
        with open(repo_copy / "src/cvae_pipeline" / module, "a") as changed:
            changed.write("\n# a change\n")
        assert run(["dvc", "repro"], repo_copy, **env).returncode == 0
    runs = runs_in(repo_copy)
    assert len(runs) == 6 and {run_id: run_record(run_id) for run_id in records_before} == records_before
    for run_id in runs["run_id"]:
        for key in ("eval_test_elbo", "final_validation_elbo"):
            assert steps(run_id, key) == [0], (run_id, key)
        assert steps(run_id) == [1, 2]


# --- 3. one point per epoch, one model per training, across kills -------------------------------------------------

def assert_one_point_per_epoch_and_one_model(runs: pd.DataFrame, checkpoint, scored: str = "validation") -> None:
    """After kills at every point of a 3-epoch training and its resume: one finished run, each epoch's metrics logged
    once (points counted, not steps), the final metrics once, one logged model, and the checkpoint marked finished."""
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run_id = runs.iloc[0]["run_id"]
    for key in (f"{scored}_elbo", "train_loss", "epoch_seconds"):
        assert steps(run_id, key) == [1, 2, 3], key
    assert steps(run_id, f"final_{scored}_elbo") == [0]
    assert len(models_of(run_id)) == 1
    with np.load(checkpoint) as saved:
        assert bool(saved["finished"]) and int(saved["epoch"]) == 3


class Killed(BaseException):
    """Stands for a kill -9 at one point of the train stage."""


def test_kills_between_checkpointing_and_logging_leave_one_point_per_epoch_and_one_model(small_data, tmp_path,
                                                                                         monkeypatch):
    from cvae_pipeline.tracking import session as tracking
    from cvae_pipeline.training.checkpoints import Checkpoint
    from cvae_pipeline.training.stage import TrainOutputs, train_and_track
    from helpers import params_with

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = params_with(model={"latent_dim": 2}, train={**TINY["train"], "epochs": 3, "batch_size": 64})
    outputs = TrainOutputs(*(tmp_path / name for name in ("m.keras", "h.csv", "t.json", "p.npz", "r.json", "c.npz",
                                                         "s.json")))

    def kill(owner, name, before: bool, when) -> None:
        original = getattr(owner, name)

        def killed(*args, **kwargs):
            if before and when(*args, **kwargs):
                raise Killed
            result = original(*args, **kwargs)
            if not before and when(*args, **kwargs):
                raise Killed
            return result

        with monkeypatch.context() as patch, pytest.raises(Killed):
            patch.setattr(owner, name, killed)
            train_and_track(params, small_data, outputs)

    kill(tracking.Session, "log_missing_epochs", True,  # epoch 2 saved, not logged
         lambda self, history: [row["epoch"] for row in history] == [2])
    kill(tracking.Session, "log_metrics", False, lambda self, metrics, step=None, **_: "final_epochs" in metrics)
    kill(Checkpoint, "save", True, lambda self, snapshot, progress, finished=False: finished)  # the model is logged
    train_and_track(params, small_data, outputs)

    assert_one_point_per_epoch_and_one_model(mlflow.search_runs(experiment_names=[params.tracking.experiment]),
                                             outputs.checkpoint, scored="test")  # small_data: no validation set


# Loaded through PYTHONPATH by every Python process of a `dvc repro`; in the train stage alone, it wraps the first
# function its kill plan (a JSON list) names so that the process SIGKILLs itself before or after the call that matches,
# and takes that point off the plan first: each `dvc repro` dies at the next point, as a real kill -9 would.
KILL_PLAN = """
import json, os, signal, sys
plan_file = os.environ.get("CVAE_TEST_KILL_PLAN")
if plan_file and sys.argv and sys.argv[0].endswith("stages/train.py"):
    with open(plan_file) as handle:
        plan = json.load(handle)
    if plan:
        point = plan[0]
        sys.path.insert(0, os.path.join(os.getcwd(), "src"))  # the copy's code, as the stage itself imports it
        from cvae_pipeline.tracking import session as tracking
        from cvae_pipeline.training.checkpoints import Checkpoint
        owner = {"Session": tracking.Session, "Checkpoint": Checkpoint}[point["owner"]]
        original, matches = getattr(owner, point["name"]), eval(point["when"])

        def kill():
            with open(plan_file, "w") as handle:
                json.dump(plan[1:], handle)
            os.kill(os.getpid(), signal.SIGKILL)

        def wrapped(*args, **kwargs):
            if point["before"] and matches(*args, **kwargs):
                kill()
            result = original(*args, **kwargs)
            if not point["before"] and matches(*args, **kwargs):
                kill()
            return result

        setattr(owner, point["name"], wrapped)
"""


def test_kill_9s_between_checkpointing_and_logging_leave_one_point_per_epoch_and_one_model(repo_copy, fake_mnist,
                                                                                           tmp_path):
    plan = [  # each a kill -9 of `dvc repro train` at one point, then the next `dvc repro` resumes
        {"owner": "Session", "name": "log_missing_epochs", "before": True,  # epoch 2 checkpointed, not logged
         "when": "lambda self, history: [row['epoch'] for row in history] == [2]"},
        {"owner": "Session", "name": "log_metrics", "before": False,  # the final metrics logged, not the model
         "when": "lambda self, metrics, step=None, **_: 'final_epochs' in metrics"},
        {"owner": "Checkpoint", "name": "save", "before": True,  # the model logged, the checkpoint not marked finished
         "when": "lambda self, snapshot, progress, finished=False: finished"},
    ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "sitecustomize.py").write_text(KILL_PLAN)
    env = {**setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3}),
           "CVAE_TEST_KILL_PLAN": str(tmp_path / "plan.json"), "PYTHONPATH": str(tmp_path)}
    for left in (2, 1, 0):
        killed = run(["dvc", "repro", "train"], repo_copy, **env)
        assert killed.returncode != 0 and len(json.loads((tmp_path / "plan.json").read_text())) == left, \
            killed.stderr[-3000:]
    done = run(["dvc", "repro", "train"], repo_copy, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch 3" in done.stderr

    assert_one_point_per_epoch_and_one_model(runs_in(repo_copy), repo_copy / "models/checkpoint.npz")


# --- 4. a run id the store does not know ---------------------------------------------------------------------------

def test_outputs_from_another_store_are_recorded_in_a_new_run_that_names_the_original(ran_pipeline, tmp_path):
    repo_copy, env = ran_pipeline
    original = json.loads((repo_copy / "models/mlflow_run.json").read_text())["run_id"]
    other = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}  # a teammate's, or a new one
    result = run(["dvc", "repro", "-s", "-f", "evaluate", "visualize"], repo_copy, **other)  # one execution
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count(f"names MLflow run {original}, which the store") == 2  # one line from each stage
    mlflow.set_tracking_uri(other["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cvae-mnist"])
    assert len(runs) == 1  # evaluate made it, visualize found it
    found = runs.iloc[0]
    assert found["tags.training_run_id"] == original and found["status"] == "FINISHED"
    assert steps(found["run_id"]) == [1, 2] and steps(found["run_id"], "eval_test_elbo") == [0]
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(found["run_id"], "figures")} == FIGURES


def test_a_training_resumed_against_another_store_continues_in_a_new_run_that_names_the_first(repo_copy, fake_mnist,
                                                                                            tmp_path):
    env = setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    kill_training_once_checkpointed(repo_copy, **env)
    first = runs_in(repo_copy).iloc[0]["run_id"]
    epoch = int(np.load(repo_copy / "models/checkpoint.npz")["epoch"])
    other = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    resumed = run(["dvc", "repro", "train"], repo_copy, **other)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {epoch}" in resumed.stderr
    assert f"the checkpoint's MLflow run {first} is not in the store" in resumed.stderr
    mlflow.set_tracking_uri(other["MLFLOW_TRACKING_URI"])
    found = mlflow.search_runs(experiment_names=["cvae-mnist"]).iloc[0]
    assert found["tags.resumed_from_run_id"] == first
    assert steps(found["run_id"]) == [1, 2, 3]  # the epochs before the switch too, each once


def test_a_training_resumed_after_an_evaluate_param_changed_continues_in_a_new_run_that_says_why(repo_copy, fake_mnist):
    # The checkpoint holds the same training (evaluate params are not trained), so it resumes; but an MLflow run's
    # params cannot change, and the run must say what was used: the rest goes to a new run that names the first.
    env = setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3}, evaluate={"iwae_k": 5})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    kill_training_once_checkpointed(repo_copy, **env)
    first = runs_in(repo_copy).iloc[0]["run_id"]
    epoch = int(np.load(repo_copy / "models/checkpoint.npz")["epoch"])
    setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3}, evaluate={"iwae_k": 7})
    resumed = run(["dvc", "repro", "train"], repo_copy, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {epoch}" in resumed.stderr
    assert f"the checkpoint's MLflow run {first} was logged with other params (evaluate.iwae_k: 5 -> 7)" \
        in resumed.stderr
    runs = runs_in(repo_copy).set_index("run_id")
    assert runs.loc[first, "params.evaluate.iwae_k"] == "5" and runs.loc[first, "status"] == "KILLED"
    (second,) = runs.index.drop(first)
    assert runs.loc[second, "tags.resumed_from_run_id"] == first and runs.loc[second, "params.evaluate.iwae_k"] == "7"
    assert steps(second) == [1, 2, 3]


# --- 5. damaged files ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_done(tmp_path_factory, pipeline_template):
    """A copy in which the whole tiny pipeline ran once, for this module's tests of damaged files."""
    source, env = pipeline_template
    return copy_repository(source, tmp_path_factory.mktemp("damaged") / "repo"), dict(env)


def other_shape(path):
    with open(path, "wb") as handle:
        np.savez(handle, grids=np.zeros((3, 4), np.uint8), epochs=np.arange(3))


def flip_bytes(path):
    """Corrupt the middle of the file (a compressed .npz: its deflate stream or its checksum)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - byte for byte in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def word_for_a_number(path):
    header, first, *rest = path.read_text().splitlines()
    path.write_text("\n".join([header, first.replace(",", ",nan-ish ", 1), *rest]) + "\n")


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGED = {  # file, how it is damaged, the stage that reads it, what its one line says
    "prepared data": ("data/prepared/mnist.npz", truncate, "train", "damaged prepared data"),
    "progress grids": ("models/progress_grids.npz", truncate, "visualize", "damaged progress grids"),
    "progress grids of another shape": ("models/progress_grids.npz", other_shape, "visualize",
                                        "damaged progress grids"),
    "run reference": ("models/mlflow_run.json", truncate, "evaluate", "damaged MLflow run reference"),
    "run reference with a bad id": ("models/mlflow_run.json", lambda p: p.write_text('{"run_id": "../x"}'),
                                    "visualize", "damaged MLflow run reference"),
    "progress grids with flipped bytes": ("models/progress_grids.npz", flip_bytes, "visualize",
                                          "damaged progress grids"),
    "training history": ("reports/train_history.csv", lambda p: p.write_bytes(b"\x00\xff"), "evaluate", "damaged"),
    "training history with a word for a number": ("reports/train_history.csv", word_for_a_number, "visualize",
                                                  "damaged"),
    "model": ("models/cvae.keras", truncate, "evaluate", "not a model this version of cvae_pipeline can load"),
    "evaluate's metrics without their splits": ("reports/metrics.json", lambda p: p.write_text('{"elbo": -80.0}'),
                                                "visualize", "damaged metrics (not the test and validation sets'"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_file_stops_its_reader_in_one_line_and_nothing_is_written(pipeline_done, case):
    repo, env = pipeline_done
    relative, damage, stage, message = DAMAGED[case]
    path = repo / relative
    intact = path.read_bytes()
    damage(path)
    before, runs_before = snapshot(repo), len(runs_in(repo))
    try:
        result = run(stage_commands(repo)[stage], repo, **env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(relative) and message in last and "run `dvc repro" in last, last
        assert snapshot(repo) == before and len(runs_in(repo)) == runs_before
    finally:
        path.write_bytes(intact)


def test_a_damaged_checkpoint_is_ignored_with_a_warning_and_training_starts_afresh(repo_copy, fake_mnist):
    env = setup_copy(repo_copy, fake_mnist, train={**TINY["train"], "epochs": 3})
    assert run(["dvc", "repro", "prepare"], repo_copy, **env).returncode == 0
    kill_training_once_checkpointed(repo_copy, **env)
    truncate(repo_copy / "models/checkpoint.npz")
    result = run(["dvc", "repro", "train"], repo_copy, **env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "models/checkpoint.npz is damaged" in result.stderr and "starts afresh at epoch 1" in result.stderr
    assert "resuming" not in result.stderr
    assert pd.read_csv(repo_copy / "reports/train_history.csv")["epoch"].tolist() == [1, 2, 3]

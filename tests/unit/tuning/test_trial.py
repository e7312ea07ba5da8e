"""One trial's train stage: dvc.yaml's command with every output in the trial's folder; watched epoch by epoch from
its checkpoint; pruned or stopped by SIGINT (as Ctrl-C), its failure's last line kept as the reason."""

import json
import sys
import threading
import time

import numpy as np

from cvae_pipeline.tuning.trial import TrialProcess, pipeline_paths, read_history, train_command
from helpers import REPO

# A stand-in for the train stage: one history row per epoch in its checkpoint (written whole, by rename, as the stage
# does), then its metrics; on SIGINT it says so, leaves a mark and exits 130, as the stage does.
FAKE_STAGE = """
import json, os, sys, time
import numpy as np
checkpoint, metrics, epochs, fail_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
history = []
try:
    for epoch in range(1, epochs + 1):
        time.sleep(0.3)
        if epoch == fail_at:
            print("train: the loss became NaN at epoch %d: lower train.learning_rate" % epoch, flush=True)
            sys.exit(1)
        history.append({"epoch": epoch, "validation_elbo": -100.0 + epoch})
        np.savez(checkpoint + ".tmp.npz", history=np.array(json.dumps(history)))
        os.replace(checkpoint + ".tmp.npz", checkpoint)
    with open(metrics, "w") as sink:
        json.dump({"validation_elbo": history[-1]["validation_elbo"], "train_seconds": 1.5}, sink)
except KeyboardInterrupt:
    open(checkpoint + ".interrupted", "w").close()
    print("train: interrupted", flush=True)
    sys.exit(130)
"""


def fake_trial(tmp_path, epochs=4, fail_at=0):
    script = tmp_path / "stage.py"
    script.write_text(FAKE_STAGE)
    outputs = {"checkpoint": tmp_path / "checkpoint.npz", "train_metrics": tmp_path / "train_metrics.json"}
    command = [sys.executable, str(script), str(outputs["checkpoint"]), str(outputs["train_metrics"]), str(epochs),
               str(fail_at)]
    return TrialProcess(command, outputs, tmp_path / "train.log", {"PATH": "/usr/bin:/bin"}), outputs


def test_the_trial_command_is_dvc_yamls_train_stage_with_every_output_in_the_trials_folder(tmp_path):
    folder, prepared = tmp_path / "trial-3", tmp_path / "data.npz"
    command, outputs = train_command(REPO, folder, prepared, folder / "params.yaml")
    assert command[0] == sys.executable and command[1] == "stages/train.py"
    assert command[-2:] == ["--params", str(folder / "params.yaml")]
    assert command[command.index("--prepared") + 1] == str(prepared)
    paths = pipeline_paths(REPO)
    assert {"checkpoint", "train_metrics", "model", "run"} <= set(outputs)
    for name, path in outputs.items():
        assert path.parent == folder and path.name == paths[name].split("/")[-1]
        assert str(path) in command
    workspace = [value for name, value in paths.items() if name != "prepared"]
    assert not any(word in workspace for word in command)  # nothing of the workspace is written


def test_a_complete_trial_reports_every_epoch_and_its_metrics(tmp_path):
    process, _ = fake_trial(tmp_path, epochs=3)
    seen = []
    outcome = process.run(lambda row: seen.append(row["epoch"]), threading.Event(), tmp_path)
    assert outcome.state == "complete" and outcome.metrics["validation_elbo"] == -97.0
    assert seen == [1, 2, 3]  # each once, the last ones too even when the stage ended between two looks


def test_a_pruned_trial_gets_sigint_like_ctrl_c_and_ends_with_the_reason(tmp_path):
    process, outputs = fake_trial(tmp_path, epochs=50)
    outcome = process.run(lambda row: "pruned at epoch 2" if row["epoch"] == 2 else None, threading.Event(),
                          tmp_path)
    assert outcome.state == "pruned" and outcome.reason == "pruned at epoch 2"
    assert (tmp_path / "checkpoint.npz.interrupted").exists()  # a SIGINT, which the stage handled
    assert not outputs["train_metrics"].exists()
    assert read_history(outputs["checkpoint"])[-1]["epoch"] < 50


def test_a_failed_trial_keeps_the_stages_last_line_as_its_reason(tmp_path):
    process, _ = fake_trial(tmp_path, epochs=4, fail_at=2)
    outcome = process.run(lambda row: None, threading.Event(), tmp_path)
    assert outcome.state == "failed"
    assert outcome.reason == "train: the loss became NaN at epoch 2: lower train.learning_rate"


def test_stopping_a_trial_interrupts_its_stage_at_once(tmp_path):
    process, _ = fake_trial(tmp_path, epochs=200)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    outcome = process.run(lambda row: None, stop, tmp_path)
    assert outcome.state == "stopped" and "Ctrl-C" in outcome.reason
    assert time.monotonic() - started < 10
    assert (tmp_path / "checkpoint.npz.interrupted").exists()


def test_the_history_of_a_missing_or_damaged_checkpoint_is_empty(tmp_path):
    assert read_history(tmp_path / "none.npz") == []
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert read_history(tmp_path / "bad.npz") == []
    np.savez(tmp_path / "good.npz", history=np.array(json.dumps([{"epoch": 1}])))
    assert read_history(tmp_path / "good.npz") == [{"epoch": 1}]

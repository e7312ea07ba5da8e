"""tf.distribute: the strategy choice; MirroredStrategy (2 and 3 logical CPUs) and MultiWorkerMirroredStrategy (2 worker
processes on loopback) training to the one-device loss curve at the same global batch size, and summing the replicas'
gradients to the one-device gradient; workers that disagree or die; and the README's launch of workers with
`dvc exp run`, two repository copies standing in for two hosts."""

import json
import os
import re
import socket
import subprocess
import sys

import pandas
import pytest

from cvae_pipeline.errors import UserInputError
from cvae_pipeline.training.distribution import make_strategy, resolve
from helpers import REPO, subprocess_env, timeless
from repositories import QUICK_EVALUATION, make_repo_copy, runs_in, setup_copy

pytestmark = pytest.mark.slow

TOLERANCE = 0.02  # relative, per epoch: the replicas draw other noise than one device does, nothing else differs
EPOCHS = 3
STEP_TOLERANCE = 0.02  # the two draw other noise; a wrong sum or mean is off by 50-100%

# Trains the small synthetic set, once per task in argv[2:]: "curve:<batch>" (EPOCHS epochs of Adam at that batch
# size) or "step:<images>" (one plain SGD step over that many images: its size is the gradient's). The tasks share a
# process because importing TensorFlow costs more than training; each trainer starts from the seed again.
SCRIPT = """
import json, os, sys
sys.path.insert(0, os.environ["TESTS"])
import tensorflow as tf
if os.environ.get("LOGICAL_CPUS"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(os.environ["LOGICAL_CPUS"]))])
import keras
import numpy as np
from helpers import make_trainer, params_with, synthetic_digits
from cvae_pipeline.data import PreparedData, Split
from cvae_pipeline.model import optimization
strategy, epochs = sys.argv[1], int(os.environ["EPOCHS"])
data = PreparedData(Split(*synthetic_digits(512, seed=1)), Split(*synthetic_digits(128, seed=2)))

def trainer_for(data, **train):
    return make_trainer(params_with(model={"latent_dim": 4}, train={"learning_rate": 1e-3, "schedule": "constant",
                                    "strategy": strategy, "precision": "float32", **train}), data)

def curve(batch):
    trainer = trainer_for(data, batch_size=batch, epochs=epochs)
    losses = [trainer.train_epoch(epoch)["train_loss"] for epoch in range(1, epochs + 1)]
    return {"curve": losses, "replicas": trainer.strategy.num_replicas_in_sync,
            "batch": trainer.training_set.batch_size, "steps": trainer.training_set.steps_per_epoch,
            "chief": trainer.is_chief, "test_elbo": trainer.scorer.evaluate()["test_elbo"]}

def step(count):
    optimization.make_optimizer = lambda cfg, precision, steps_per_epoch: keras.optimizers.SGD(cfg.learning_rate)
    trainer = trainer_for(PreparedData(Split(data.train.images[:count], data.train.labels[:count]), data.test),
                          batch_size=count)
    before = [variable.numpy() for variable in trainer.model.trainable_variables]
    trainer.train_epoch(1)
    after = [variable.numpy() for variable in trainer.model.trainable_variables]
    size = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))
    return {"step": float(size), "replicas": trainer.strategy.num_replicas_in_sync}

tasks = sorted(sys.argv[2:], key=lambda task: task.startswith("step"))  # curves first: steps replace the optimizer
results = {task: {"curve": curve, "step": step}[task.split(":")[0]](int(task.split(":")[1])) for task in tasks}
print("RESULT", json.dumps(results))
"""


def start(script: str, *args: str, **env: str) -> subprocess.Popen:
    """`script` in a fresh Python process (devices can only be split before TensorFlow starts), with the tests'
    helpers importable from TESTS."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TESTS": str(REPO / "tests"), **env}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def train(strategy: str, *tasks: str, **env: str) -> subprocess.Popen:
    """SCRIPT's `tasks` on `strategy`; `result` reads what they give, by task."""
    return start(SCRIPT, strategy, *tasks, EPOCHS=str(EPOCHS), **env)


def cluster(workers: list[str], index: int) -> str:
    """TF_CONFIG for worker `index` of `workers`."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])


@pytest.fixture(scope="module")
def trained():
    """What one device and 2 and 3 mirrored replicas (logical CPUs) train, by strategy and task: 3 replicas at
    batch 30 and over 510 images, which they split evenly."""
    processes = {"one_device": train("one_device", "curve:32", "curve:30", "step:512", "step:510"),
                 "mirrored 2": train("mirrored", "curve:32", "step:512", LOGICAL_CPUS="2"),
                 "mirrored 3": train("mirrored", "curve:30", "step:510", LOGICAL_CPUS="3")}
    return {name: result(process) for name, process in processes.items()}


def assert_same_curve(curve, reference):
    assert len(curve) == len(reference) == EPOCHS
    for epoch, (value, expected) in enumerate(zip(curve, reference, strict=True), start=1):
        assert abs(value - expected) <= TOLERANCE * abs(expected), (epoch, curve, reference)
    assert curve[-1] < curve[0]  # and it learns


@pytest.mark.parametrize(("name", "gpus", "chosen"), [("auto", 0, "one_device"), ("auto", 1, "one_device"),
                                                      ("auto", 2, "mirrored"), ("mirrored", 0, "mirrored"),
                                                      ("one_device", 4, "one_device")])
def test_auto_mirrors_over_several_gpus_only(name, gpus, chosen):
    assert resolve(name, gpus) == chosen


def test_mirrored_on_two_logical_cpus_follows_the_one_device_curve(trained):
    mirrored = trained["mirrored 2"]["curve:32"]
    assert mirrored["replicas"] == 2
    assert_same_curve(mirrored["curve"], trained["one_device"]["curve:32"]["curve"])


def test_three_replicas_and_a_last_batch_too_short_to_share_follow_the_one_device_curve(trained):
    """512 = 17 x 30 + 2: one device trains on the 2, three replicas drop them (one would have no image)."""
    mirrored = trained["mirrored 3"]["curve:30"]
    assert mirrored["replicas"] == 3
    assert_same_curve(mirrored["curve"], trained["one_device"]["curve:30"]["curve"])


def test_the_default_batch_trains_on_replicas_it_does_not_split_over_rounded_down_to_whole_images_each():
    """tf.distribute would hand 100 images to 8 replicas as 13 x 7 + 9: they train on 96, 12 each. The rounding on 1
    to 8 replicas is test_hardware's; this trains on the most of them, for real."""
    mirrored = result(train("mirrored", "curve:100", LOGICAL_CPUS="8"))["curve:100"]
    assert (mirrored["replicas"], mirrored["batch"], mirrored["steps"]) == (8, 96, 512 // 96)
    assert mirrored["curve"][-1] < mirrored["curve"][0]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def test_two_workers_on_loopback_follow_the_one_device_curve(trained):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [train("multi_worker", "curve:32", TF_CONFIG=cluster(workers, index)) for index in range(2)]
    chief, other = (result(process)["curve:32"] for process in processes)
    assert chief["replicas"] == other["replicas"] == 2
    assert chief["chief"] and not other["chief"]
    assert chief["curve"] == other["curve"]  # the all-reduced losses...
    assert chief["test_elbo"] == other["test_elbo"]  # ...and each worker's own weights: one model, in lockstep
    assert_same_curve(chief["curve"], trained["one_device"]["curve:32"]["curve"])


@pytest.mark.parametrize(("replicas", "images"), [(2, 512), (3, 510)])
def test_replicas_sum_their_gradients_to_the_one_device_gradient(trained, replicas, images):
    """Adam hides a gradient off by a constant factor (its step is scale-free); a plain SGD step does not: the
    replicas' gradients of their share of the global mean must add up to the one-device gradient."""
    one, mirrored = trained["one_device"][f"step:{images}"], trained[f"mirrored {replicas}"][f"step:{images}"]
    assert mirrored["replicas"] == replicas
    assert abs(mirrored["step"] / one["step"] - 1) <= STEP_TOLERANCE, (mirrored, one)


@pytest.mark.parametrize(("cluster_spec", "message"), [
    (None, "train.strategy=multi_worker needs TF_CONFIG (the cluster and this worker's index, as JSON)"),
    ("", "train.strategy=multi_worker needs TF_CONFIG"),
    ('{"task": {"index": 0}}', "TF_CONFIG: not a cluster spec with workers"),
])
def test_multi_worker_without_a_cluster_says_what_is_missing(monkeypatch, cluster_spec, message):
    if cluster_spec is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", cluster_spec)
    with pytest.raises(UserInputError, match=re.escape(message)):
        make_strategy("multi_worker")


ENDLESS = """
import os, sys
sys.path.insert(0, os.environ["TESTS"])
from helpers import make_trainer, params_with, synthetic_digits
from cvae_pipeline.data import PreparedData, Split
data = PreparedData(Split(*synthetic_digits(512, seed=1)), Split(*synthetic_digits(128, seed=2)))
trainer = make_trainer(params_with(model={"latent_dim": 4}, train={"batch_size": 32, "strategy": "multi_worker",
                                                            "precision": "float32"}), data)
for epoch in range(1, 1000):
    trainer.train_epoch(epoch)
    print("EPOCH", epoch, flush=True)
"""


def test_when_a_worker_dies_the_others_stop_saying_so():
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    chief, doomed = (start(ENDLESS, TF_CONFIG=cluster(workers, index)) for index in range(2))
    try:
        if not any(line.startswith("EPOCH 1") for line in doomed.stdout):  # stops reading at the first epoch's end
            pytest.fail("the second worker ended before its first epoch")
        doomed.kill()
        _, err = chief.communicate(timeout=120)  # loopback resets the connection at once; TF's health check, else
    finally:
        for process in (chief, doomed):
            process.kill()
            process.wait()
    assert chief.returncode != 0
    assert "another worker of the cluster is gone" in err and "start every worker again" in err


AGREEMENT = """
import sys
import tensorflow as tf
from cvae_pipeline.training.distribution import require_same_on_every_worker
strategy = tf.distribute.MultiWorkerMirroredStrategy()
for round, epoch in enumerate(sys.argv[1:], start=1):
    require_same_on_every_worker(strategy, {"checkpoint epoch": int(epoch)}, "give them the same checkpoint")
    print("AGREED", round, flush=True)
"""


def test_workers_resuming_from_different_checkpoints_all_stop_saying_why():
    """Two rounds in one cluster: both workers at epoch 3 go on; then the first at 0 and the second at 3 both stop."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    epochs = [("3", "0"), ("3", "3")]
    processes = [start(AGREEMENT, *rounds, TF_CONFIG=cluster(workers, index)) for index, rounds in enumerate(epochs)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert "AGREED 1" in out, err[-2000:]
        # every worker stops, not only the one that differs from the chief
        assert process.returncode != 0 and "AGREED 2" not in out
        assert "the workers disagree on their checkpoint epoch (0, 3): give them the same checkpoint" in err


def test_the_readme_launch_two_hosts_with_dvc_exp_run(tmp_path, fake_mnist):
    """Each "host" is its own clone of one commit; both run `dvc exp run -S train.strategy=multi_worker` at once."""
    hosts = [make_repo_copy(tmp_path / name) for name in ("host1", "host2")]
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index, host in enumerate(hosts):
        env = setup_copy(host, fake_mnist, evaluate=QUICK_EVALUATION)
        processes.append(subprocess.Popen(["dvc", "exp", "run", "-S", "train.strategy=multi_worker"], cwd=host,
                                          env=subprocess_env(TF_CONFIG=cluster(workers, index), **env), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for process in processes:
        out, _ = process.communicate(timeout=900)
        assert process.returncode == 0, out[-3000:]
        assert "2 replica(s)" in out  # one cluster, not two machines each training alone
    from cvae_pipeline.training.loop import TIMING_COLUMNS

    chief, other = hosts
    # One model, trained in lockstep: the same losses and scores on both; only the timings differ.
    untimed = [*TIMING_COLUMNS, "train_seconds", "seconds_to_quality"]
    histories = [timeless(pandas.read_csv(host / "reports/train_history.csv")) for host in hosts]
    pandas.testing.assert_frame_equal(*histories)
    finals = [{key: value for key, value in json.loads((host / "reports/train_metrics.json").read_text()).items()
               if key not in untimed} for host in hosts]
    assert finals[0] == finals[1]
    assert (chief / "reports/metrics.json").read_text() == (other / "reports/metrics.json").read_text()
    runs = runs_in(chief)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["params.train.strategy"] == "multi_worker"
    assert json.loads((other / "models/mlflow_run.json").read_text())["run_id"] is None  # only the chief logs
    assert not (other / "mlflow.db").exists() or runs_in(other).empty

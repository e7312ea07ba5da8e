"""tf.distribute: the strategy choice, and MirroredStrategy (2 logical CPUs) and MultiWorkerMirroredStrategy (2 worker
processes on loopback) training to the one-device loss curve at the same global batch size."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from cvae_pipeline.distribution import resolve

pytestmark = pytest.mark.slow

TOLERANCE = 0.02  # relative, per epoch: the replicas draw other noise than one device does, nothing else differs
EPOCHS = 3

# Trains the small synthetic set in a fresh process (devices can only be split before TensorFlow starts).
SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import tensorflow as tf
if os.environ.get("LOGICAL_CPUS"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(os.environ["LOGICAL_CPUS"]))])
from conftest import params_with, synthetic_digits
from cvae_pipeline.data import PreparedData, Split
from cvae_pipeline.training import Trainer
data = PreparedData(Split(*synthetic_digits(512, seed=1)), Split(*synthetic_digits(128, seed=2)))
params = params_with(model={{"latent_dim": 4}}, train={{"batch_size": 32, "learning_rate": 1e-3, "epochs": {epochs},
                     "strategy": sys.argv[1], "precision": "float32"}})
trainer = Trainer(params, data)
curve = [trainer.train_epoch(epoch)["train_loss"] for epoch in range(1, {epochs} + 1)]
print("RESULT", json.dumps({{"curve": curve, "replicas": trainer.strategy.num_replicas_in_sync,
                            "chief": trainer.is_chief, "test_elbo": trainer.evaluate()["test_elbo"]}}))
""".format(tests=str(REPO / "tests"), epochs=EPOCHS)


def train(strategy: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, strategy], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])


@pytest.fixture(scope="module")
def one_device():
    return result(train("one_device"))


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


def test_mirrored_on_two_logical_cpus_follows_the_one_device_curve(one_device):
    mirrored = result(train("mirrored", LOGICAL_CPUS="2"))
    assert mirrored["replicas"] == 2
    assert_same_curve(mirrored["curve"], one_device["curve"])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def test_two_workers_on_loopback_follow_the_one_device_curve(one_device):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [train("multi_worker", TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                             "task": {"type": "worker", "index": index}}))
                 for index in range(2)]
    chief, other = (result(process) for process in processes)
    assert chief["replicas"] == other["replicas"] == 2
    assert chief["chief"] and not other["chief"]
    assert chief["curve"] == other["curve"]  # one model, trained in lockstep
    assert_same_curve(chief["curve"], one_device["curve"])


def test_multi_worker_without_a_cluster_says_what_is_missing():
    process = train("multi_worker", TF_CONFIG="")
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "train.strategy=multi_worker needs TF_CONFIG" in err

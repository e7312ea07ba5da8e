"""Which tf.distribute strategy trains the model (`train.strategy`), and whether this process is the chief.

`auto` picks MirroredStrategy when several GPUs are visible, else the default strategy on the one device.
`multi_worker` (MultiWorkerMirroredStrategy) reads the cluster from `TF_CONFIG`; every worker runs the same train
stage in its own clone of the repository and writes the same outputs there; only the chief (worker 0) logs to MLflow.
"""

import json
import os

import tensorflow as tf

from cvae_pipeline.errors import TrainingError, UserInputError

CLUSTER_ENV = "TF_CONFIG"


def resolve(name: str, gpu_count: int) -> str:
    """`train.strategy` with `auto` decided: mirrored over several GPUs, else one device."""
    if name == "auto":
        return "mirrored" if gpu_count > 1 else "one_device"
    return name


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy for `train.strategy`; call it before any other TensorFlow work (multi-worker needs that)."""
    if name == "multi_worker":
        cluster = os.environ.get(CLUSTER_ENV)
        if not cluster:
            raise UserInputError(f"train.strategy=multi_worker needs {CLUSTER_ENV} (the cluster and this worker's "
                                 "index, as JSON); see docs/team.md, or use one_device, mirrored or auto")
        try:
            json.loads(cluster)["cluster"]["worker"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"{CLUSTER_ENV}: not a cluster spec with workers ({error!r})") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if resolve(name, len(gpus)) == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()  # one device: the default strategy, no replication


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process logs to MLflow: always, but for the workers other than the chief of a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def lost_worker(error: tf.errors.UnavailableError) -> str:
    """The line of a collective's failure that says why (TensorFlow's message runs to many lines of gRPC detail)."""
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip()] or ["unavailable"]
    at = next((index for index, line in enumerate(lines) if "aborted" in line), len(lines) - 1)
    return " ".join(lines[at:at + 2] if lines[at].endswith(":") else lines[at:at + 1])


def require_same_on_every_worker(strategy: tf.distribute.Strategy, values: dict[str, int], remedy: str) -> None:
    """Stop every worker of a cluster, with the same message, unless all hold the same `values`."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return  # one process: nothing can differ
    mine = list(values.values())
    rows = strategy.gather(strategy.run(lambda: tf.constant([mine], tf.int64)), axis=0).numpy()
    for column, name in enumerate(values):
        seen = sorted({int(value) for value in rows[:, column]})
        if len(seen) > 1:
            raise TrainingError(f"the workers disagree on their {name} ({', '.join(map(str, seen))}): {remedy}")

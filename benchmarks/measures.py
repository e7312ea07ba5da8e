"""What `make bench` measures, each function run in a fresh process by `run.py` (`--measure NAME`), printing JSON.

Two kinds of speed: the training loop's throughput (windows of images inside one process, after a warm-up), and
the wall clock of the whole train stage as a user waits for it (`stage`: the real `stages/train.py`, from scratch,
with its checkpoints, MLflow logging and scoring), beside the yardstick's whole script (`reference_stage`:
`tutorial_loop.py`, the tutorial's loop). Both train on the prepared file's training split.

The sizes below are module settings so that a test can measure the same code at a tiny size.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
YARDSTICK = Path(__file__).resolve().parent / "tutorial_loop.py"
PATHS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]  # dvc.yaml: the paths' one source
PREPARED = ROOT / PATHS["prepared"]
WINDOW_IMAGES = 12_000  # training images a throughput window
WINDOWS = 5
PEAK_SIDE = 2048  # of the square matrices whose product measures the peak


def python(*args: str, timeout: float = 3600, env: dict | None = None) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def params_raw(**train) -> dict:
    """params.yaml as a mapping, with some `train` keys replaced."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(train)
    return raw


def params_with(**train):
    from cvae_pipeline.config import parse_params

    return parse_params(yaml.safe_dump(params_raw(**train)))


def peak() -> dict:
    """Matrix-product GFLOP/s in float32 and bfloat16: what the hardware offers."""
    import tensorflow as tf

    result = {}
    for dtype in ("float32", "bfloat16"):
        a = tf.cast(tf.random.normal((PEAK_SIDE, PEAK_SIDE), dtype=tf.float32), dtype)
        product = tf.function(lambda x: tf.matmul(x, x))
        product(a).numpy()
        rates = []
        for _ in range(WINDOWS):
            started = time.perf_counter()
            for _ in range(10):
                out = product(a)
            out.numpy()
            rates.append(10 * 2 * PEAK_SIDE**3 / (time.perf_counter() - started) / 1e9)
        result[dtype] = statistics.median(rates)
    return result


def project(overrides: dict) -> dict:
    """The training loop's throughput: windows of the first WINDOW_IMAGES training images after a warm-up epoch."""
    from cvae_pipeline.data import PreparedData, Split, load_prepared
    from cvae_pipeline.training.loop import Trainer
    from cvae_pipeline.training.process import set_up

    params = params_with(**overrides)
    setup = set_up(params)  # process-wide (seeds, precision policy, strategy): first, and once, as in a train stage
    data = load_prepared(PREPARED)
    subset = PreparedData(Split(data.train.images[:WINDOW_IMAGES], data.train.labels[:WINDOW_IMAGES]), data.test)
    trainer = Trainer(params, subset, setup=setup)
    trainer.train_epoch(1)  # warm-up: tracing, allocation
    rates = [trainer.train_epoch(epoch)["images_per_second"] for epoch in range(2, 2 + WINDOWS)]
    return {"images_per_second": statistics.median(rates), "windows": rates,
            "window_images": len(trainer.training_set.images)}


def yardstick(*arguments: str) -> dict:
    """Run the yardstick's whole script on PREPARED; what it wrote (its history, its sets' sizes) and its wall
    clock from launch to exit."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "yardstick.json"
        started = time.perf_counter()
        python(str(YARDSTICK), f"--prepared={PREPARED}", f"--json={out}", *arguments)
        seconds = time.perf_counter() - started
        return {**json.loads(out.read_text()), "seconds": seconds}


def reference() -> dict:
    """The yardstick's in-epoch throughput over the same windows."""
    run = yardstick(f"--epochs={WINDOWS + 1}", f"--train-limit={WINDOW_IMAGES}")
    rates = [row["images_per_second"] for row in run["history"][1:]]
    return {"images_per_second": statistics.median(rates), "windows": rates, "window_images": run["train_images"]}


def stage(config: dict) -> dict:
    """The real train stage (`stages/train.py`) in a fresh process, from scratch, with its own MLflow store, on the
    prepared file's whole training split: its wall clock from launch to exit, and its history (per-epoch timings)."""
    import pandas as pd

    from cvae_pipeline.data import load_prepared

    overrides, epochs = config["train"], config["epochs"]
    train_images = len(load_prepared(PREPARED).train.images)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "params.yaml").write_text(yaml.safe_dump(params_raw(**overrides, epochs=epochs)))
        outputs = {"model": "cvae.keras", "history": "history.csv", "metrics": "metrics.json",
                   "progress": "progress.npz", "run": "run.json", "checkpoint": "checkpoint.npz",
                   "settings": "settings.json"}
        arguments = [f"--{name}={folder / file}" for name, file in outputs.items()]
        started = time.perf_counter()
        python("stages/train.py", f"--params={folder / 'params.yaml'}", f"--prepared={PREPARED}", *arguments,
               env={"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
        seconds = time.perf_counter() - started
        history = pd.read_csv(folder / "history.csv").to_dict("records")
    return {"seconds": seconds, "epochs": epochs, "history": history, "train_images": train_images}


def reference_stage(config: dict) -> dict:
    """The yardstick's whole script for `epochs` epochs on the whole training split: launch to exit."""
    run = yardstick(f"--epochs={config['epochs']}")
    return {"seconds": run["seconds"], "epochs": config["epochs"], "history": run["history"],
            "train_images": run["train_images"], "test_images": run["test_images"]}


def iwae(config: dict) -> dict:
    """The evaluate stage's scoring (ELBO and IWAE with `k`) of the test set, by an untrained model."""
    from cvae_pipeline.data import load_prepared
    from cvae_pipeline.evaluation.stage import Evaluator
    from cvae_pipeline.model.network import build_cvae

    params = params_with()
    cfg = params.evaluate.model_copy(update={"iwae_k": config.get("k", params.evaluate.iwae_k)})
    images = load_prepared(PREPARED).test.images[: config.get("images")]
    started = time.perf_counter()
    Evaluator(build_cvae(params.model, "float32"), cfg, params.seed).evaluate(images)
    return {"seconds": time.perf_counter() - started, "k": cfg.iwae_k, "images": len(images)}


def mlflow() -> dict:
    """Per-epoch metric logging and the one-time logging of a run, into a fresh SQLite store."""
    import numpy as np

    from cvae_pipeline import scores
    from cvae_pipeline.model.network import build_cvae
    from cvae_pipeline.tracking.session import Session

    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        params = params_with()
        started = time.perf_counter()
        session = Session(params.tracking)
        with session.open_run() as run:
            session.log_params(params)
            setup = time.perf_counter() - started
            epoch_costs = []
            for step in range(1, 21):
                began = time.perf_counter()
                names = (scores.TRAIN_LOSS, *scores.epoch_columns(scores.VALIDATION), "epoch_seconds",
                         "eval_seconds", "images_per_second", "learning_rate", "elapsed_seconds")
                session.log_metrics({name: float(step) for name in names}, step)
                epoch_costs.append(time.perf_counter() - began)
            model_file = Path(folder) / "model.keras"
            build_cvae(params.model).save(model_file)
            began = time.perf_counter()
            from cvae_pipeline.training.stage import log_model

            log_model(session.client, run.info.run_id, model_file, np.zeros((2, 28, 28, 1), np.float32))
            model_seconds = time.perf_counter() - began
    return {"setup_seconds": setup, "per_epoch_seconds": statistics.median(epoch_costs),
            "model_seconds": model_seconds}


def startup() -> dict:
    """Seconds from process start to a stage's libraries loaded (what every stage pays before its work)."""
    imports = {"prepare": "cvae_pipeline.data", "train": "cvae_pipeline.training.stage",
               "evaluate": "cvae_pipeline.evaluation.stage", "visualize": "cvae_pipeline.evaluation.figures"}
    result = {}
    for name, module in imports.items():
        times = []
        for _ in range(3):
            began = time.perf_counter()
            python("-c", f"import {module}")
            times.append(time.perf_counter() - began)
        result[name] = statistics.median(times)
    return result


def noop_repro() -> dict:
    dvc = shutil.which("dvc", path=Path(sys.executable).parent) or "dvc"  # this environment's, activated or not
    status = subprocess.run([dvc, "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode or json.loads(status.stdout or "{}"):
        return {"seconds": None, "note": "pipeline not up to date: run `make repro` first"}
    times = []
    for _ in range(3):
        began = time.perf_counter()
        subprocess.run([dvc, "repro"], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - began)
    return {"seconds": statistics.median(times)}


def machine() -> dict:
    """The devices, and what `auto` makes of them (as the train stage decides it)."""
    from importlib.metadata import version

    from cvae_pipeline.training import hardware

    found = hardware.detect()
    precision = hardware.choose_precision("auto", found)
    return {"device": found.describe(), "cpu": found.cpu_model, "cpu_flags": found.shown_cpu_flags,
            "gpus": [gpu.name for gpu in found.gpus], "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": version("tensorflow"), "auto_precision": precision.value,
            "auto_precision_reason": precision.reason, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


MEASURES = {"machine": machine, "peak": peak, "project": project, "reference": reference, "stage": stage,
            "reference_stage": reference_stage, "iwae": iwae, "mlflow": mlflow}
WITH_CONFIG = {"project", "stage", "reference_stage", "iwae"}

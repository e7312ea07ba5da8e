"""`make bench`'s measuring code, every measure that its full, `--quick` and `--precisions` modes run, at a tiny size:
a change of the project's API breaks this test rather than a user's 40-minute benchmark. And what the measures
return is what the harness's summary and report read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cvae_pipeline.data import PreparedData, Split, save_prepared
from helpers import REPO, subprocess_env, synthetic_digits

sys.path.insert(0, str(REPO / "benchmarks"))

import report  # the harness is a script folder, not a package
import run

pytestmark = pytest.mark.training  # the measures train models for real

# One fresh process measures them all, as `run.py --measure NAME --config JSON` would one by one (each would import
# TensorFlow again), at the sizes a test affords: windows of 200 images, the matrix product at 64x64.
MEASURING = """
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import measures, run
measures.PREPARED = Path(sys.argv[1])
measures.WINDOW_IMAGES, measures.WINDOWS, measures.PEAK_SIDE = 200, 2, 64
results = {key: json.loads(run.run_measure(name, config)) for key, name, config in json.loads(sys.argv[2])}
Path(sys.argv[3]).write_text(json.dumps(results))
"""
SHORT, LONG = 1, 2  # epochs of the stage comparison's runs: the long one is measured, the short one is its first epoch
CALLS = [  # key in the results, measure, config: each as `run.collect` asks for it, but for the epochs
    ("machine", "machine", None),
    ("peak", "peak", None),
    ("project", "project", {}),  # the default: `auto` decides the precision
    ("reference", "reference", None),
    (f"stage {LONG}", "stage", {"train": {}, "epochs": LONG}),
    (f"reference_stage {LONG}", "reference_stage", {"epochs": LONG}),
    ("iwae", "iwae", {"k": 2}),
    ("mlflow", "mlflow", None),
]


def first_epochs(measured: dict, epochs: int) -> dict:
    """A stage measure's result as a run of its first `epochs` epochs would give it (each run launches a process that
    trains: one is what the test affords)."""
    return {**measured, "epochs": epochs, "history": measured["history"][:epochs],
            "seconds": measured["seconds"] * epochs / measured["epochs"]}


def tiny_prepared(path: Path) -> Path:
    """A prepared file as the prepare stage writes it: 200 training, 100 validation and 100 test images."""
    splits = {name: Split(*synthetic_digits(count, seed)) for name, count, seed in
              (("train", 200, 1), ("validation", 100, 2), ("test", 100, 3))}
    save_prepared(PreparedData(**splits), path)
    return path


def test_every_measure_of_every_mode_runs_and_the_report_reads_what_they_return(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-c", MEASURING, str(tiny_prepared(tmp_path / "mnist.npz")),
                           json.dumps(CALLS), str(out)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(out.read_text())
    for name in ("stage", "reference_stage"):
        measured[f"{name} {SHORT}"] = first_epochs(measured[f"{name} {LONG}"], SHORT)

    assert len(measured["project"]["windows"]) == 2 and measured["project"]["window_images"] == 200
    assert len(measured["reference"]["windows"]) == 2 and measured["reference"]["window_images"] == 200
    for epochs in (SHORT, LONG):  # the stage and the yardstick train on the same images: the training split
        stage, yardstick = measured[f"stage {epochs}"], measured[f"reference_stage {epochs}"]
        assert [row["epoch"] for row in stage["history"]] == list(range(1, epochs + 1))
        assert [row["epoch"] for row in yardstick["history"]] == list(range(1, epochs + 1))
        assert stage["train_images"] == yardstick["train_images"] == 200 and yardstick["test_images"] == 100
    assert measured["iwae"]["k"] == 2 and measured["iwae"]["images"] == 100

    # The whole report of a full run from these: each mode's measures, in the places `run.collect` puts them.
    monkeypatch.setattr(run, "STAGE_EPOCHS", (SHORT, LONG))
    stages = [measured[f"stage {epochs}"] for epochs in (SHORT, LONG)]
    results = {"machine": measured["machine"], "peak": measured["peak"],
               "configs": {name: measured["project"] for name in (run.DEFAULT, *run.CONFIGS)},
               "reference": [measured["reference"]], "stages": dict.fromkeys(run.STAGES, stages),
               "reference_stages": [measured[f"reference_stage {epochs}"] for epochs in (SHORT, LONG)],
               "time_to_quality": stages[-1], "iwae": measured["iwae"], "mlflow": measured["mlflow"],
               # Not measures: run.py times these itself, in processes of their own (imports, `dvc repro`).
               "startup": {"train": 1.0}, "noop_repro": {"seconds": 1.0}}
    text = run.write_report(results, tmp_path / "benchmark")
    assert "| yardstick: tutorial_loop.py | float32 |" in text
    assert "windows of 200 training images" in text and "on the same 200 training images" in text
    assert "Time to quality" in text and "MLflow:" in text
    assert json.loads((tmp_path / "benchmark.json").read_text())["summary"]["time_to_quality"]["split"] == "validation"
    assert report.precision_of(run.DEFAULT, measured["machine"]).endswith("(auto)")

"""Benchmark harness (`make bench`): the project's speed and time to quality, beside the tutorial's own loop.

Each measurement runs in a fresh process (`measures.py`). The yardstick, `tutorial_loop.py` (the tutorial's training
loop, float32, written from its description), runs alternately with the project, on the same training images: the
prepared file's training split (50,000 by default: `data.validation_size` holds 10,000 of the 60,000 out).

- the training loop's throughput: medians of windows of 12,000 images after a warm-up, per configuration;
- the whole train stage by the wall clock, as a user waits for it: per epoch, (4-epoch run - 2-epoch run) / 2, both
  from scratch on the whole training split (2 and 4, not 1 and 3: the default's warm-up takes the first epoch),
  the project's `stages/train.py` (checkpoints, MLflow, scoring the validation set in float32) against the
  yardstick's whole script (which scores the test set); and the time between two epochs that is neither training nor
  scoring, from the stage's history;
- time to quality: the default train stage from launch until its per-epoch ELBO (float32, on the validation set, or
  the test set where there is none) first reaches -78.3, against the yardstick's 95 epochs at its measured epoch time.

Results go to `reports/benchmark.md` (and `.json`).

    python benchmarks/run.py [--quick | --precisions] [--out reports/benchmark]

`--quick` (about 15 minutes): what the wall clock says, alone: one repetition of the stage comparison and time to
quality; no throughput windows, no IWAE. `--precisions`: only what
`train.precision: auto` chooses between (the default against float32 and mixed_bfloat16), in a few minutes.
"""

import argparse
import itertools
import json
import operator
import statistics
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measures import MEASURES, PREPARED, ROOT, WITH_CONFIG, noop_repro, params_with, python, startup
from report import report

from cvae_pipeline.config import TUTORIAL_ELBO  # the tutorial's printed test ELBO after 100 epochs
from cvae_pipeline.fileio import write_bytes_atomic
from cvae_pipeline.scores import per_epoch, scored_split

YARDSTICK_EPOCHS_TO_QUALITY = 95  # epochs the yardstick needs to reach it at Adam 1e-4 (measured for issue 16)
STAGE_REPETITIONS = 3  # a median of 3: one stalled repetition (a busy machine) does not decide it
STAGE_EPOCHS = (2, 4)  # per epoch: (4-epoch run - 2-epoch run) / 2; start-up and the first epoch's tracing cancel out
DISTURBED = 0.15  # a repetition whose short and long runs time their common epochs this much apart is left out
DEFAULT = "default (params.yaml)"
FLOAT32 = "float32, 120 steps a call"  # the default's settings but for the precision
BFLOAT16 = "mixed_bfloat16, 120 steps a call"
TUTORIAL = {"precision": "float32", "batch_size": 100, "learning_rate": 1e-4, "schedule": "constant",
            "warmup_epochs": 0, "final_learning_rate": 0, "ema_momentum": 0}
CONFIGS = {  # name: train params over params.yaml, for the throughput windows
    "tutorial (float32, batch 100, 1 step a call)": {**TUTORIAL, "steps_per_call": 1},
    FLOAT32: {"precision": "float32", "batch_size": 100, "steps_per_call": 120},
    BFLOAT16: {"precision": "mixed_bfloat16", "batch_size": 100, "steps_per_call": 120},
    "mixed_bfloat16, batch 500, 1 step a call": {"precision": "mixed_bfloat16", "batch_size": 500, "steps_per_call": 1},
}
STAGES = {  # name: train params over params.yaml, for the whole-stage wall clock
    "tutorial configuration (float32, batch 100, 500 images scored an epoch)": {**TUTORIAL, "eval_limit": 500},
    DEFAULT: {},
}


def measure(name: str, config: dict | None = None) -> dict:
    """Run one measurement in a fresh process and return what it printed (JSON)."""
    args = [str(Path(__file__).resolve()), "--measure", name]
    if config is not None:
        args += ["--config", json.dumps(config)]
    return json.loads(python(*args).strip().splitlines()[-1])


def collect_throughput(results: dict, precisions: bool) -> None:
    configs = {DEFAULT: {}, **CONFIGS}
    if precisions:
        configs = {name: configs[name] for name in (DEFAULT, FLOAT32, BFLOAT16)}
    for name, config in configs.items():
        # Alternate: the machine's state drifts, and both sides should see the same drift.
        results["reference"].append(measure("reference"))
        results["configs"][name] = measure("project", config)
        print(f"{name}: {results['configs'][name]['images_per_second']:.0f} images/s", file=sys.stderr)


def collect_stages(results: dict, repetitions: int) -> None:
    """Short and long runs of the yardstick and of each stage configuration, interleaved, `repetitions` times."""
    for repetition in range(repetitions):
        for epochs in STAGE_EPOCHS:
            results["reference_stages"].append(measure("reference_stage", {"epochs": epochs}))
            for name, overrides in STAGES.items():
                run = measure("stage", {"train": overrides, "epochs": epochs})
                results["stages"].setdefault(name, []).append(run)
                print(f"stage {name}, {epochs} epoch(s), repetition {repetition + 1}: {run['seconds']:.1f} s",
                      file=sys.stderr)


def collect(quick: bool, precisions: bool, results: dict) -> dict:
    """Fill `results` measurement by measurement (the caller keeps what was measured when one fails)."""
    results.update({"machine": measure("machine"), "peak": measure("peak"), "configs": {}, "reference": [],
                    "stages": {}, "reference_stages": []})
    found = results["machine"]
    print(f"{found['device']}: CPU flags {' '.join(found['cpu_flags']) or '(none of note)'}; train.precision auto "
          f"chooses {found['auto_precision']} ({found['auto_precision_reason']})", file=sys.stderr)
    if not quick:
        collect_throughput(results, precisions)
    if not precisions:
        collect_stages(results, 1 if quick else STAGE_REPETITIONS)
        results["time_to_quality"] = measure("stage", {"train": {}, "epochs": params_with().train.epochs})
    if not (quick or precisions):
        results["iwae"] = measure("iwae", {})
    results["mlflow"] = measure("mlflow")
    results["startup"] = startup()
    results["noop_repro"] = noop_repro()
    return results


def epoch_walls(runs: list[dict]) -> list[float]:
    """Per repetition, (long run - short run) / their difference in epochs: an epoch's wall clock, with the start-up
    and the first epoch's tracing cancelled out."""
    short, long = STAGE_EPOCHS
    shorts = [run["seconds"] for run in runs if run["epochs"] == short]
    longs = [run["seconds"] for run in runs if run["epochs"] == long]
    return [(b - a) / (long - short) for a, b in zip(shorts, longs, strict=True)]


def timed_epochs(run: dict) -> list[float]:
    """Each epoch's own timing, from the run's history: the yardstick's `seconds` (training and its scoring), the
    project's training and scoring."""
    return [row["seconds"] if "seconds" in row else row["epoch_seconds"] + row["eval_seconds"]
            for row in run["history"]]


def disturbed(runs: list[dict]) -> list[bool]:
    """Per repetition: whether its short and long runs disagree, by more than DISTURBED, on the time of the epochs
    both train. Then something else ran beside one of them, and the difference of their wall clocks measures that,
    not an epoch (seen here: a yardstick's first epoch at half speed made its epoch look 12 s instead of 20 s)."""
    short, long = STAGE_EPOCHS
    firsts = {epochs: [sum(timed_epochs(run)[:short]) for run in runs if run["epochs"] == epochs]
              for epochs in (short, long)}
    return [abs(a - b) > DISTURBED * min(a, b) for a, b in zip(firsts[short], firsts[long], strict=True)]


def per_epoch_wall(runs: list[dict]) -> float | None:
    """The median of `epoch_walls` over the repetitions that were not `disturbed`; None when every one was."""
    walls = [wall for wall, noisy in zip(epoch_walls(runs), disturbed(runs), strict=True) if not noisy]
    return statistics.median(walls) if walls else None


def between_epochs(runs: list[dict]) -> list[float]:
    """From the stage's own history: the share of each epoch (one end of scoring to the next) that was neither
    training nor scoring: the checkpoint, MLflow, the progress grid, bookkeeping."""
    shares = []
    for run in runs:
        rows = run["history"]
        for before, row in itertools.pairwise(rows):
            span = row["elapsed_seconds"] - before["elapsed_seconds"]
            shares.append((span - row["epoch_seconds"] - row["eval_seconds"]) / span)
    return shares


def summarize_stages(results: dict, summary: dict) -> None:
    if not results["stages"]:
        return
    yardstick_runs = results["reference_stages"]
    yardstick_noisy = disturbed(yardstick_runs) if yardstick_runs else []
    reference = per_epoch_wall(yardstick_runs) if yardstick_runs else None
    summary["reference_epoch_seconds"] = reference
    summary["reference_disturbed"] = sum(yardstick_noisy)
    summary["disturbed_threshold"] = DISTURBED
    summary["stages"] = {}
    for name, runs in results["stages"].items():
        wall, noisy = per_epoch_wall(runs), disturbed(runs)
        shares = between_epochs([run for run in runs if run["epochs"] == STAGE_EPOCHS[1]])
        scoring = [row["eval_seconds"] for run in runs for row in run["history"]]
        # Each repetition's ratio pairs the runs measured back to back: their spread is the measurement's noise.
        by_repetition = ([yardstick / project for yardstick, project, left_out in
                          zip(epoch_walls(yardstick_runs), epoch_walls(runs),
                              map(operator.or_, yardstick_noisy, noisy), strict=True) if not left_out]
                         if yardstick_runs else [])
        summary["stages"][name] = {"epoch_seconds": wall, "ratio": reference / wall if reference and wall else None,
                                   "ratio_by_repetition": by_repetition, "disturbed": sum(noisy),
                                   "between_epochs_median": statistics.median(shares),
                                   "between_epochs_max": max(shares), "scoring_seconds": statistics.median(scoring)}
    ttq = results.get("time_to_quality")
    if ttq:
        split = scored_split(pd.DataFrame(ttq["history"]))  # what each epoch scored
        elbo = per_epoch(split)
        reached = [row for row in ttq["history"] if row[elbo] >= TUTORIAL_ELBO]
        summary["time_to_quality"] = {"epoch": reached[0]["epoch"] if reached else None,
                                      "seconds": reached[0]["elapsed_seconds"] if reached else None,
                                      "split": split, "final_elbo": ttq["history"][-1][elbo]}
        if reference and reached:
            shorts = [run for run in yardstick_runs if run["epochs"] == STAGE_EPOCHS[0]]
            short = statistics.median(run["seconds"] for run, left_out in zip(shorts, yardstick_noisy, strict=True)
                                      if not left_out)
            yardstick = short + (YARDSTICK_EPOCHS_TO_QUALITY - STAGE_EPOCHS[0]) * reference
            summary["time_to_quality"].update(yardstick_seconds=yardstick,
                                              ratio=yardstick / reached[0]["elapsed_seconds"])


def summarize(results: dict) -> dict:
    from report import training_flops_per_image

    flops = training_flops_per_image()
    configs = {name: value["images_per_second"] for name, value in results["configs"].items()}
    summary = {"flops_per_image": flops, "images_per_second": configs,
               "gflops": {name: rate * flops / 1e9 for name, rate in configs.items()}}
    if configs:
        summary["fastest"] = max((name for name in CONFIGS if name in configs), key=configs.get)
        # `auto` must be about as fast as the better of the two precisions it chooses between.
        summary["default_vs_best_precision"] = configs[DEFAULT] / max(configs[FLOAT32], configs[BFLOAT16])
    if results["reference"]:
        summary["reference_images_per_second"] = statistics.median(w for r in results["reference"]
                                                                   for w in r["windows"])
    summarize_stages(results, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one stage repetition and time to quality only")
    parser.add_argument("--precisions", action="store_true", help="only the default, float32 and mixed_bfloat16")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmark")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(run_measure(args.measure, args.config))
        return
    if not PREPARED.is_file():
        sys.exit(f"{PREPARED.relative_to(ROOT)} is missing: run `make repro` (or `dvc repro prepare`) first")
    results: dict = {}
    try:
        collect(args.quick, args.precisions, results)
    except BaseException:
        partial = args.out.with_suffix(".partial.json")
        write_bytes_atomic(partial, json.dumps(results, indent=1).encode())
        print(f"stopped; what was measured is in {partial}", file=sys.stderr)
        raise
    print(write_report(results, args.out))


def run_measure(name: str, config: dict | None) -> str:
    """What `--measure NAME --config JSON` prints: the measure's result, as one line of JSON."""
    return json.dumps(MEASURES[name](*([config] if name in WITH_CONFIG else [])))


def write_report(results: dict, out: Path) -> str:
    """Summarize `results` into `out`.json (with them) and `out`.md, each written whole or not at all."""
    summary = summarize(results)
    write_bytes_atomic(out.with_suffix(".json"), json.dumps({"results": results, "summary": summary},
                                                            indent=1).encode())
    text = report(results, summary, TUTORIAL_ELBO, YARDSTICK_EPOCHS_TO_QUALITY)
    write_bytes_atomic(out.with_suffix(".md"), text.encode())
    return text


if __name__ == "__main__":
    main()

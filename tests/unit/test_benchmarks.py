"""The benchmark harness's arithmetic (`benchmarks/run.py`) on made-up timings: an epoch's wall clock from a short
and a long run, each repetition's ratio to the yardstick, the share of an epoch spent between epochs, and the
repetitions that other work disturbed left out."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report  # the harness is a script folder, not a package
import run


def stage_runs(seconds: dict[int, list[float]], gap: float = 0.0) -> list[dict]:
    """Runs of a stage: for each epoch count, one run a repetition; each epoch trains 10 s and scores 1 s."""
    runs = []
    for epochs, durations in seconds.items():
        for duration in durations:
            history = [{"epoch": epoch, "epoch_seconds": 10.0, "eval_seconds": 1.0,
                        "elapsed_seconds": 5.0 + epoch * (11.0 + gap), "test_elbo": -100.0 + epoch}
                       for epoch in range(1, epochs + 1)]
            runs.append({"epochs": epochs, "seconds": duration, "history": history})
    return runs


def test_each_repetition_pairs_the_yardstick_with_the_project_run_beside_it():
    short, long = run.STAGE_EPOCHS
    span = long - short
    # The yardstick's second repetition stalled; the project's first was slow.
    results = {"reference_stages": stage_runs({short: [50, 50, 50], long: [50 + 20 * span, 50 + 40 * span,
                                                                              50 + 20 * span]}),
               "stages": {"project": stage_runs({short: [40, 40, 40], long: [40 + 20 * span, 40 + 10 * span,
                                                                              40 + 10 * span]}, gap=0.11)}}
    summary: dict = {}
    run.summarize_stages(results, summary)

    row = summary["stages"]["project"]
    assert summary["reference_epoch_seconds"] == 20  # the median: the stalled repetition does not decide it
    assert row["epoch_seconds"] == 10
    assert row["ratio"] == 2
    assert row["ratio_by_repetition"] == [1, 4, 2]
    assert row["between_epochs_median"] == pytest.approx(0.11 / 11.11)  # 0.11 s of 11.11 s from epoch to epoch
    assert row["scoring_seconds"] == 1


def yardstick_runs(seconds: dict[int, list[float]], first_epoch: dict[int, list[float]]) -> list[dict]:
    """Runs of the yardstick's script: each epoch timed 20 s by the script itself, but the first as given."""
    return [{"epochs": epochs, "seconds": duration,
             "history": [{"epoch": epoch, "seconds": first if epoch == 1 else 20.0} for epoch in range(1, epochs + 1)]}
            for epochs in seconds for duration, first in zip(seconds[epochs], first_epoch[epochs], strict=True)]


def test_a_repetition_disturbed_by_other_work_is_left_out_and_a_wholly_disturbed_comparison_is_not_made():
    short, long = run.STAGE_EPOCHS
    span = long - short
    project = {"project": stage_runs({short: [40, 40], long: [40 + 10 * span, 40 + 10 * span]})}
    # The second repetition's short run had its first epoch at half speed: the difference of the wall clocks would
    # make an epoch look 10 s shorter than the script timed each one.
    stalled = yardstick_runs({short: [50, 70], long: [50 + 20 * span, 50 + 20 * span]},
                             {short: [20, 40], long: [20, 20]})
    summary: dict = {}
    run.summarize_stages({"reference_stages": stalled, "stages": project}, summary)
    assert summary["reference_epoch_seconds"] == 20 and summary["reference_disturbed"] == 1
    assert summary["stages"]["project"]["ratio_by_repetition"] == [2]  # the first repetition alone

    everywhere = yardstick_runs({short: [70, 70], long: [50 + 20 * span, 50 + 20 * span]},
                                {short: [40, 40], long: [20, 20]})
    summary = {}
    run.summarize_stages({"reference_stages": everywhere, "stages": project}, summary)
    assert summary["reference_epoch_seconds"] is None and summary["stages"]["project"]["ratio"] is None
    text = "\n".join(report.stages({"machine": {"auto_precision": "float32"}, "stages": project}, summary))
    assert "| yardstick: tutorial_loop.py | float32 | n/a (disturbed) |" in text
    assert "Repetitions left out as disturbed" in text and "yardstick 2" in text and "rerun `make bench`" in text

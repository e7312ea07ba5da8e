"""Every figure that README.md and docs/ state about the committed default run and the committed study of `make tune`,
formatted from the committed reports (`reports/*.json`, `reports/train_history.csv`, `reports/tune/trials.csv`): after
a new `make repro` or `make tune`, this test names each sentence gone stale, with the sentence the reports now give,
ready to paste. `python tests/test_docs_figures.py` prints every sentence.

A claim is a file and a sentence template whose fields are read from the reports (`{test[elbo]:.2f}`: evaluate's test
ELBO); whitespace is compared as one space, so a sentence may wrap. Figures about other runs or machines (benchmarks,
sweeps, runs of older code) are not checked here: each carries its date and machine in its sentence or table."""

import csv
import json
import math
import re
import statistics
import string
import sys
from pathlib import Path

import yaml

from cvae_pipeline.config import TUTORIAL_ELBO

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"
PIXELS = 28 * 28
PACKED_BYTES = 98  # one bit-packed image in data/prepared/mnist.npz

# The same statement of how long the default run trains, in each document that says how long a run takes.
TRAIN_STAGE = "the train stage of the committed default run took {derived[train_minutes]:.0f} minutes ({train[elapsed_seconds]:.0f} s)"  # noqa: E501

CLAIMS = [
    # README.md: the quickstart, the pipeline, the results of the default run.
    ("README.md", TRAIN_STAGE),
    ("README.md", "hold {data[validation][images]:,} training images out for validation"),
    ("README.md", "latent_dim {params[model][latent_dim]}, batch {params[train][batch_size]}, {train[epochs]} epochs "
                  "over {data[train][images]:,} training images ({data[validation][images]:,} held out for "
                  "validation)"),
    ("README.md", "precision `{params[train][precision]}`, seed {params[seed]}."),
    ("README.md", "The committed `reports/` come from a 2-core VM, {settings[device]}, where `auto` trains in "
                  "{settings[precision]}."),
    ("README.md", "on the 2-core VM of the results below ({settings[precision]}, {settings[device]})"),
    ("README.md", "| metric (`reports/metrics.json`) | test ({test[images]:,} images) | validation "
                  "({validation[images]:,} images) |"),
    ("README.md", "| `elbo` | {test[elbo]:.2f} | {validation[elbo]:.2f} | ELBO: analytic KL, reconstruction averaged "
                  "over {test[samples]} draws of z |"),
    ("README.md", "| `reconstruction_nll` | {test[reconstruction_nll]:.2f} | {validation[reconstruction_nll]:.2f} |"),
    ("README.md", "| `kl` | {test[kl]:.2f} | {validation[kl]:.2f} |"),
    ("README.md", "| `iwae` (`iwae_k` = {test[iwae_k]}) | {test[iwae]:.2f} | {validation[iwae]:.2f} |"),
    ("README.md", "| `pixel_accuracy` | {test[pixel_accuracy]:.4f} | {validation[pixel_accuracy]:.4f} |"),
    ("README.md", "| `bce_per_pixel` | {test[bce_per_pixel]:.4f} | {validation[bce_per_pixel]:.4f} |"),
    ("README.md", "| `active_units` | {test[active_units]} of {params[model][latent_dim]} | "
                  "{validation[active_units]} of {params[model][latent_dim]} |"),
    ("README.md", "Its ELBO, {test[elbo]:.2f}, is {derived[gain_over_tutorial]:.1f} nats better than the tutorial's "
                  "published -78.3"),
    ("README.md", "score {derived[validation_below_test]:.1f} nats lower than the test images"),
    ("README.md", "passes -78.3 after epoch {train[epoch_to_quality]}, {train[seconds_to_quality]:.0f} s from the "
                  "train stage's start, and ends at {train[validation_elbo]:.2f} after {train[epochs]}"),
    ("README.md", "the training loss of the last epoch, {train[train_loss]:.2f}, is {derived[loss_below_elbo]:.1f} "
                  "nats below that epoch's validation negative ELBO"),
    # docs/recipe.md: the default recipe's committed run.
    ("docs/recipe.md", "The committed default run (`reports/`; a 2-core VM, {settings[device]}, in "
                       "{settings[precision]}"),
    ("docs/recipe.md", "the default holds {data[validation][images]:,} training images out for validation"),
    ("docs/recipe.md", "trained on {data[train][images]:,} images: its validation ELBO passes the tutorial's published "
                       "-78.3 after epoch {train[epoch_to_quality]}, {train[seconds_to_quality]:.0f} s from the train "
                       "stage's start, and evaluate gives {test[elbo]:.2f} on the test set and {validation[elbo]:.2f} "
                       "on the validation set"),
    ("docs/recipe.md", "score lower than the test images ({derived[validation_below_test]:.1f} nats lower in the "
                       "committed run)"),
    # docs/recipe.md: the committed study of `make tune` (reports/tune/trials.csv).
    ("docs/recipe.md", "{study[trials]}: {study[complete]} complete and {study[pruned]} pruned | trial "
                       "{study[best_trial]}: "),
    ("docs/recipe.md", "{study[best_learning_rate]}, warm-up {study[best_warmup]}, average {study[best_average]}, "
                       "batch {study[best_batch]}: {study[best_elbo]:.2f} |"),
    # docs/performance.md
    ("docs/performance.md", TRAIN_STAGE),
    ("docs/performance.md", "the committed default run's validation ELBO after epoch {train[epoch_to_quality]} of "
                            "{data[train][images]:,} images"),
    ("docs/performance.md", "float32 ({derived[device_megabytes]:.0f} MB for the default's {data[train][images]:,} "
                            "training images;"),
    ("docs/performance.md", "`train.steps_per_call: {derived[steps_per_epoch]}` runs a whole epoch of the default "
                            "({data[train][images]:,} images at batch {params[train][batch_size]})"),
    ("docs/performance.md", "from scratch on the prepared training images ({data[train][images]:,} by default)"),
    # docs/setup.md
    ("docs/setup.md", TRAIN_STAGE),
    ("docs/setup.md", "{train[epochs]} epochs of {data[train][images]:,} images, {derived[shortest_epoch_seconds]:.0f} "
                      "to {derived[longest_epoch_seconds]:.0f} s an epoch ({derived[median_epoch_seconds]:.0f} s the "
                      "median), the validation set scored after each"),
    # docs/pipeline.md
    ("docs/pipeline.md", "holds `data.validation_size` ({data[validation][images]:,}) of the 60,000 training images"),
    ("docs/pipeline.md", "{derived[packed_megabytes]:.1f} MB for all {derived[all_images]:,}"),
    # docs/serving.md: what `make promote` prints after the default `make repro`.
    ("docs/serving.md", "eval_validation_elbo {validation[elbo]:.2f}, the best of 1 finished run(s)"),
]


def read_reports(folder: Path = REPORTS) -> dict:
    """The committed reports (and params.yaml, whose values they were made with), as the templates' fields."""
    metrics = json.loads((folder / "metrics.json").read_text())
    train = json.loads((folder / "train_metrics.json").read_text())
    settings = json.loads((folder / "train_settings.json").read_text())  # the device and precision it trained with
    data = json.loads((folder / "data_summary.json").read_text())
    with open(folder / "train_history.csv", newline="") as handle:
        history = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    test, validation = metrics["test"], metrics["validation"]
    derived = {
        "gain_over_tutorial": test["elbo"] - TUTORIAL_ELBO,
        "validation_below_test": test["elbo"] - validation["elbo"],
        "loss_below_elbo": -train["validation_elbo"] - train["train_loss"],
        "train_minutes": train["elapsed_seconds"] / 60,
        "median_epoch_seconds": statistics.median(row["epoch_seconds"] for row in history),
        "shortest_epoch_seconds": min(row["epoch_seconds"] for row in history),
        "longest_epoch_seconds": max(row["epoch_seconds"] for row in history),
        "all_images": sum(split["images"] for split in data.values() if isinstance(split, dict)),
        "device_megabytes": data["train"]["images"] * PIXELS * 4 / 1e6,  # float32 images on a GPU
        "steps_per_epoch": math.ceil(data["train"]["images"] / params["train"]["batch_size"]),
    }
    derived["packed_megabytes"] = derived["all_images"] * PACKED_BYTES / 1e6
    return {"test": test, "validation": validation, "train": train, "data": data, "history": history,
            "params": params, "derived": derived, "settings": settings, "study": read_study(folder)}


def read_study(folder: Path) -> dict:
    """The committed study of `make tune` (reports/tune/trials.csv, its trials best first): counts and the best."""
    with open(folder / "tune" / "trials.csv", newline="") as handle:
        trials = list(csv.DictReader(handle))
    states = [trial["state"] for trial in trials]
    best = trials[0]
    learning_rate = f"{float(best['train.learning_rate']):.1e}".replace("e-0", "e-")  # 8.3e-3, as people write it
    return {"trials": len(trials), "complete": states.count("complete"), "pruned": states.count("pruned"),
            "failed": states.count("failed"), "best_trial": int(best["trial"]),
            "best_elbo": float(best["validation_elbo"]), "best_learning_rate": learning_rate,
            "best_warmup": int(best["train.warmup_epochs"]), "best_average": float(best["train.ema_momentum"]),
            "best_batch": int(best["train.batch_size"])}


def one_line(text: str) -> str:
    return " ".join(text.split())


def as_found(template: str) -> re.Pattern:
    """The template with each field as any number: finds the sentence whatever figures it holds now."""
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(one_line(template)):
        pattern += re.escape(literal) + (r"[-+]?\d[\d,]*(?:\.\d+)?" if field is not None else "")
    return re.compile(pattern)


def stale(reports: dict, claims=CLAIMS, repo: Path = REPO) -> list[str]:
    """One message per claim whose sentence, formatted from `reports`, is not in its file: the file, the sentence
    expected, and the sentence as the file has it where it still has one."""
    problems = []
    for file, template in claims:
        text = one_line((repo / file).read_text())
        expected = one_line(template.format(**reports))
        if expected not in text:
            found = as_found(template).search(text)
            says = f"\n    it says:   {found.group()}" if found else "\n    (no sentence of this form is there)"
            problems.append(f"{file}: stale or missing figures{says}\n    reports give: {expected}")
    return problems


def test_every_figure_about_the_default_run_is_the_reports():
    problems = stale(read_reports())
    assert not problems, "the documents disagree with reports/ (paste the sentences the reports give):\n" + "\n".join(
        problems)


def test_each_document_about_the_default_run_is_checked():
    files = {file for file, _ in CLAIMS}
    assert files == {"README.md", "docs/recipe.md", "docs/performance.md", "docs/setup.md", "docs/pipeline.md",
                     "docs/serving.md"}
    assert all((REPO / file).is_file() for file in files)
    assert sum(file == "README.md" for file, _ in CLAIMS) >= 15


def test_the_train_stage_time_is_one_statement_wherever_a_run_time_is_told():
    assert {file for file, template in CLAIMS if template == TRAIN_STAGE} == {
        "README.md", "docs/setup.md", "docs/performance.md"}


def test_the_reports_agree_with_each_other():
    """What the templates read from train_metrics.json is the history's last epoch and first crossing."""
    reports = read_reports()
    train, history = reports["train"], reports["history"]
    assert train["epochs"] == len(history) == history[-1]["epoch"]
    assert math.isclose(train["validation_elbo"], history[-1]["validation_elbo"], abs_tol=1e-3)
    assert math.isclose(train["train_loss"], history[-1]["train_loss"], abs_tol=1e-3)
    crossing = next(row for row in history if row["validation_elbo"] >= TUTORIAL_ELBO)
    assert train["epoch_to_quality"] == crossing["epoch"]
    assert math.isclose(train["seconds_to_quality"], crossing["elapsed_seconds"], abs_tol=1e-2)
    assert reports["test"]["iwae_k"] == reports["params"]["evaluate"]["iwae_k"]


def copied_reports(folder: Path) -> Path:
    folder.mkdir()
    for name in ("metrics.json", "train_metrics.json", "train_settings.json", "data_summary.json", "train_history.csv",
                 "tune/trials.csv"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes((REPORTS / name).read_bytes())
    return folder


def test_a_changed_report_names_each_stale_sentence(tmp_path):
    """A new run that crosses a later epoch, scores the test set higher and trained on another device: every sentence
    that states those figures is named, with what it says and what the reports now give."""
    now = read_reports()
    reports = copied_reports(tmp_path / "reports")
    epoch, seconds = now["train"]["epoch_to_quality"] + 1, now["train"]["seconds_to_quality"] + 29.4
    train = {**now["train"], "epoch_to_quality": epoch, "seconds_to_quality": seconds}
    (reports / "train_metrics.json").write_text(json.dumps(train))
    metrics = json.loads((reports / "metrics.json").read_text())
    metrics["test"]["elbo"] = elbo = now["test"]["elbo"] + 0.3
    (reports / "metrics.json").write_text(json.dumps(metrics))
    (reports / "train_settings.json").write_text(json.dumps({**now["settings"], "precision": "mixed_float16"}))

    problems = stale(read_reports(reports))
    crossing = [problem for problem in problems if f"passes -78.3 after epoch {epoch}, {seconds:.0f} s from" in problem]
    assert [problem.split(":")[0] for problem in crossing] == ["README.md"]
    assert f"it says:   passes -78.3 after epoch {epoch - 1}, " in crossing[0]
    assert any(problem.startswith("docs/recipe.md") and f"after epoch {epoch}, {seconds:.0f} s from the train stage's "
               f"start, and evaluate gives {elbo:.2f} on the test set" in problem for problem in problems)
    assert any(problem.startswith("docs/performance.md") and f"validation ELBO after epoch {epoch} of" in problem
               for problem in problems)
    assert any(problem.startswith("README.md") and f"| `elbo` | {elbo:.2f} | {now['validation']['elbo']:.2f} |"
               in problem for problem in problems)
    assert any(problem.startswith("README.md") and f"Its ELBO, {elbo:.2f}, is {elbo + 78.3:.1f} nats better" in problem
               for problem in problems)
    assert any(problem.startswith("README.md") and "where `auto` trains in mixed_float16." in problem
               for problem in problems)
    gone = {file for file, _ in CLAIMS} - {problem.split(":")[0] for problem in problems}
    assert gone == {"docs/setup.md", "docs/pipeline.md", "docs/serving.md"}  # none of their figures changed


def test_a_sentence_the_document_lost_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("The run took\n13 minutes.\n")
    claims = [("docs/page.md", "The run took {derived[train_minutes]:.0f} minutes."),
              ("docs/page.md", "It ended at {test[elbo]:.2f}.")]
    reports = {"derived": {"train_minutes": 13.1}, "test": {"elbo": -76.221}}
    assert stale(reports, claims, tmp_path) == [
        "docs/page.md: stale or missing figures\n    (no sentence of this form is there)\n"
        "    reports give: It ended at -76.22."]


if __name__ == "__main__":  # every sentence as the reports give it, by file
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else REPORTS
    for file, template in CLAIMS:
        print(f"{file}: {one_line(template.format(**read_reports(folder)))}")

"""Compare DVC experiments: one table of every experiment's params and metrics, and a plot against what varied.

`make compare` (`python -m cvae_pipeline.commands.compare --out reports/compare`) reads the experiments of the current
commit with `dvc.api.exp_show` and writes `<out>.csv` (every param and metric), `<out>.md` (the params that vary and
the headline metrics, best validation ELBO first) and `<out>.png` (validation ELBO, IWAE and KL against the first
param that varies, one line per value of the second if there is one).

Experiments are ranked and drawn by their validation metrics: the test set's are in the CSV, for the final report of
the experiment chosen, never for choosing it. Only where no experiment has a validation set (`data.validation_size:
0`, the tutorial's way) does the test set rank them, and the table says so.
"""

import argparse
import sys
from pathlib import Path

import dvc.api
import pandas as pd
from matplotlib.figure import Figure

from cvae_pipeline import scores
from cvae_pipeline.config import Params, Section
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.fileio import atomic_path

SPLIT_METRICS = [scores.ELBO, scores.IWAE, scores.KL, scores.RECONSTRUCTION_NLL, scores.ACTIVE_UNITS,
                 scores.PIXEL_ACCURACY]  # evaluate's, per split
TRAINING_METRICS = ["epoch_to_quality", "seconds_to_quality", "train_seconds"]


def ranking_split(table: pd.DataFrame) -> str:
    """The split experiments are ranked by: validation, unless none of them has one."""
    column = scores.experiment_column(scores.VALIDATION)
    return scores.VALIDATION if column in table and table[column].notna().any() else scores.TEST


def param_keys(cls: type[Section] = Params, prefix: str = "") -> list[str]:
    """Every key of params.yaml by its path (`train.batch_size`), in file order."""
    keys = []
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            keys += param_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def experiments_table(rows: list[dict]) -> pd.DataFrame:
    """One row per experiment (and its baseline commit), params then metrics, best validation ELBO first."""
    table = pd.DataFrame(rows)
    test_elbo = scores.experiment_column(scores.TEST)
    if table.empty or test_elbo not in table:
        raise UserInputError("no experiments with evaluate metrics here; run `dvc exp run` (see docs/experiments.md)")
    table = table[(table["rev"] != "workspace") & table[test_elbo].notna()].copy()
    table.insert(0, "experiment", table["Experiment"].fillna(table["rev"]))
    params = [key for key in param_keys() if key in table]
    for column in table.columns.difference([*params, "experiment", "Experiment", "rev", "typ", "Created", "parent",
                                           "State", "Executor"]):
        # A metric that some rows lack (an older commit's, or `seconds_to_quality` of a run that never reached
        # the tutorial's ELBO) comes as None there: numbers all the same, the gaps empty.
        table[column] = pd.to_numeric(table[column], errors="coerce")
    metrics = [column for column in table.columns
               if column not in params and column not in ("experiment", "Experiment", "rev", "typ", "Created",
                                                          "parent", "State", "Executor")
               and table[column].notna().any()]
    table = table[["experiment", "rev", *params, *metrics]]
    for key in params:
        table[key] = table[key].map(_as_in_params_file)
    # Experiments without a validation set last: nothing to rank them by but the test set.
    return table.sort_values(scores.experiment_column(ranking_split(table)), ascending=False, kind="stable",
                             na_position="last").reset_index(drop=True)


def _as_in_params_file(value):
    """DVC reports 50 as 50.0, null as 'None', false as 'False': show them as params.yaml spells them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return {"None": "null", "False": "false", "True": "true"}.get(value, value) if isinstance(value, str) else value


def varied(table: pd.DataFrame) -> list[str]:
    return [key for key in param_keys() if key in table and table[key].astype(str).nunique() > 1]


def markdown(table: pd.DataFrame) -> str:
    changing = varied(table)
    constant = [key for key in param_keys() if key in table and key not in changing]
    split = ranking_split(table)
    headline = [scores.experiment_column(split, metric) for metric in SPLIT_METRICS] + TRAINING_METRICS
    shown = table[["experiment", *changing, *[m for m in headline if m in table]]]
    fixed = ", ".join(f"`{key}={table[key].iloc[0]}`" for key in constant)
    note = ("The test set's metrics are in the CSV: the final report of the experiment you choose, not a way to "
            "choose it." if split == scores.VALIDATION else "No experiment has a validation set "
            "(`data.validation_size: 0`): ranked by the test set, whose numbers are then optimistic.")
    return (f"# Experiments, best {split} ELBO first\n\n{shown.to_markdown(index=False, floatfmt='.4g')}\n\n"
            f"Metrics in nats per {split} image (`elbo`, `iwae`: higher is better). {note} "
            f"Same in every row: {fixed}.\n")


def plot(table: pd.DataFrame, path: Path) -> None:
    changing, split = varied(table), ranking_split(table)
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    if not changing:
        figure.suptitle("No param varies between these experiments")
    else:
        x, group = changing[0], (changing[1] if len(changing) > 1 else None)
        groups = table.groupby(group, sort=True) if group else [(None, table)]
        for value, rows in groups:
            rows = rows.sort_values(x, key=lambda column: pd.to_numeric(column, errors="coerce"))
            label = f"{group}={value}" if group else None
            axes[0].plot(rows[x].astype(str), rows[scores.experiment_column(split)], marker="o",
                         label=f"ELBO {label or ''}".strip())
            iwae_k = int(rows[scores.experiment_column(split, scores.IWAE_K)].iloc[0])
            axes[0].plot(rows[x].astype(str), rows[scores.experiment_column(split, scores.IWAE)], marker="s",
                         linestyle="--", label=f"IWAE (k={iwae_k}) {label or ''}".strip())
            axes[1].plot(rows[x].astype(str), rows[scores.experiment_column(split, scores.KL)], marker="o",
                         label=label)
        axes[0].set_title(f"{split.capitalize()} bounds on log p(x) (higher is better)")
        axes[1].set_title(f"{split.capitalize()} KL(q(z|x) || p(z))")
        for ax in axes:
            ax.set_xlabel(x)
            ax.set_ylabel("nats per image")
            ax.grid(alpha=0.3)
        axes[0].legend()
        if group:
            axes[1].legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png", metadata={"Software": None})


def write_comparison(rows: list[dict], out: Path) -> pd.DataFrame:
    table = experiments_table(rows)
    with atomic_path(out.with_suffix(".csv")) as temporary:
        table.to_csv(temporary, index=False)
    with atomic_path(out.with_suffix(".md")) as temporary:
        temporary.write_text(markdown(table))
    plot(table, out.with_suffix(".png"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="path prefix of the .csv, .md and .png")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    args = parser.parse_args()
    try:
        table = write_comparison(dvc.api.exp_show(num=-1 if args.all_commits else 1), args.out)
    except UserInputError as error:
        print(error, file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"{len(table)} experiments -> {args.out}.csv, {args.out}.md, {args.out}.png")


if __name__ == "__main__":
    main()

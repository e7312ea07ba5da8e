"""What a study found: `reports/tune.md`, its trials as CSV, and figures (matplotlib, through Optuna's own plots).

The Markdown gives the search (space, fixed settings, objectives, budget, sampler, pruner), the counts of complete,
pruned and failed trials with the reasons, the best trial (or, with two objectives, the Pareto front of quality against
training time) and the command that runs it at the full budget of params.yaml; the CSV ranks every trial.
"""

import logging
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from cvae_pipeline.fileio import atomic_path
from cvae_pipeline.tuning.space import OBJECTIVES, Search
from cvae_pipeline.tuning.storage import REASON_ATTR
from cvae_pipeline.tuning.workers import counted, retried

log = logging.getLogger(__name__)

REPORT = Path("reports") / "tune.md"
STATE_NAMES = {TrialState.FAIL: "failed"}  # Optuna's FAIL, as the report and the progress line say it
FOLDER = Path("reports") / "tune"


def trials_table(study: optuna.Study, search: Search) -> pd.DataFrame:
    """One row per trial that counts, the best first: its number, state, objectives, params, the epochs it trained,
    its duration, machine and why it did not complete."""
    rows, trials = [], study.get_trials(deepcopy=False)
    for trial in counted(trials):
        row = {"trial": trial.number, "state": STATE_NAMES.get(trial.state, trial.state.name.lower())}
        for index, name in enumerate(search.objectives):
            row[name] = trial.values[index] if trial.values else None
        row.update({key: trial.params.get(key) for key in (dimension.key for dimension in search.space)})
        row["epochs"] = max(trial.intermediate_values, default=None)
        row["seconds"] = trial.duration.total_seconds() if trial.duration else None
        row["machine"] = trial.user_attrs.get("host")
        row["reason"] = trial.user_attrs.get(REASON_ATTR) or ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    first = search.objectives[0]
    table["_complete"] = table["state"] == "complete"
    table = table.sort_values(["_complete", first], ascending=[False, OBJECTIVES[first] == "minimize"],
                              na_position="last").drop(columns="_complete")
    return table.reset_index(drop=True)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial, or the Pareto front with two objectives; [] before any completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def apply_command(trial: optuna.trial.FrozenTrial) -> str:
    return f"make tune-apply TRIAL={trial.number}"


def _figure(draw, path: Path) -> Path | None:
    """One of Optuna's matplotlib plots, saved; None when the study cannot draw it yet (too few trials)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            axes = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        log.info("no %s yet (%s)", path.name, error)
        return None
    figure = axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def figures(study: optuna.Study, search: Search, folder: Path) -> list[Path]:
    from optuna.visualization import matplotlib as plots

    names = [name.replace("_", " ") for name in search.objectives]
    target = (lambda trial: trial.values[0]) if search.pareto else None
    label = search.objectives[0].replace("_", " ")
    drawn = [
        _figure(lambda: plots.plot_optimization_history(study, target=target, target_name=label),
                folder / "optimization_history.png"),
        _figure(lambda: plots.plot_param_importances(study, target=target, target_name=label),
                folder / "param_importances.png"),
        _figure(lambda: plots.plot_parallel_coordinate(study, target=target, target_name=label),
                folder / "parallel_coordinates.png"),
    ]
    if search.pareto:
        drawn.append(_figure(lambda: plots.plot_pareto_front(study, target_names=names),
                             folder / "pareto_front.png"))
    elif search.prunes:
        drawn.append(_figure(lambda: plots.plot_intermediate_values(study), folder / "learning_curves.png"))
    return [path for path in drawn if path is not None]


def markdown(study: optuna.Study, search: Search, table: pd.DataFrame, pictures: list[Path], storage: str,
             budget: int) -> str:
    trials = study.get_trials(deepcopy=False)
    states = table["state"].value_counts().to_dict() if not table.empty else {}
    lines = [f"# Study `{search.study}`", "",
             f"Storage: `{storage}`. Objective{'s' if search.pareto else ''}: "
             + ", ".join(f"{name} ({OBJECTIVES[name]})" for name in search.objectives)
             + f", on the validation set. Budget: {budget} trials. Sampler: {search.sampler.name} (seed "
             f"{search.sampler.seed}). Pruner: "
             + (f"{search.pruner.name} on the per-epoch validation ELBO, once {search.pruner.startup_trials} "
                f"trial(s) completed and {search.pruner.warmup_epochs} epochs of each" if search.prunes else
                "none" + (" (pruning does not apply to two objectives)" if search.pareto else "")) + ".",
             "", "Every trial is params.yaml with " + (", ".join(f"`{key}: {value}`" for key, value in
                                                              search.fixed.items()) or "nothing fixed")
             + ", and these varied:", ""]
    for dimension in search.space:
        what = (f"one of {list(dimension.choices)}" if dimension.choices else
                f"{dimension.low} to {dimension.high}" + (", log scale" if dimension.log else "")
                + (f", step {dimension.step}" if dimension.step else ""))
        lines.append(f"- `{dimension.key}`: {what}")
    lines += ["", f"Trials: {len(table)} of {budget}: " + ", ".join(f"{states.get(state, 0)} {state}"
                                                                    for state in ("complete", "pruned", "failed",
                                                                                  "running", "waiting"))
              + f"; {len(retried(trials))} cut short by a dead worker or Ctrl-C, their params run again.", ""]
    failed = table[table["state"] == "failed"] if not table.empty else table
    for _, row in failed.iterrows():
        lines.append(f"- trial {row['trial']} failed: {row['reason']}")
    best = best_trials(study)
    if best:
        lines += ["", "## Pareto front (quality against training time)" if search.pareto else "## Best", ""]
        for trial in best:
            values = ", ".join(f"{name} {value:.2f}" for name, value in zip(search.objectives, trial.values,
                                                                            strict=True))
            params = ", ".join(f"`{key}={value}`" for key, value in trial.params.items())
            lines.append(f"- trial {trial.number}: {values}; {params}; at the full budget: `{apply_command(trial)}`")
    lines += ["", "## Trials, best first", "", table.to_markdown(index=False, floatfmt=".4g") if not table.empty
              else "(none yet)", ""]
    lines += [f"![{path.stem.replace('_', ' ')}]({path.relative_to(REPORT.parent).as_posix()})" for path in pictures]
    return "\n".join(lines) + "\n"


def write_report(study: optuna.Study, search: Search, root: Path, storage: str, budget: int) -> list[Path]:
    """reports/tune.md, reports/tune/trials.csv and the figures; the files written."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    table = trials_table(study, search)
    with atomic_path(folder / "trials.csv") as temporary:
        table.to_csv(temporary, index=False)
    pictures = figures(study, search, folder)
    text = markdown(study, search, table, [path.relative_to(root) for path in pictures], storage, budget)
    with atomic_path(root / REPORT) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return [root / REPORT, folder / "trials.csv", *pictures]

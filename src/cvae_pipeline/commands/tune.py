"""`make tune`, `make tune-apply`, `make tune-dashboard`: an Optuna search over params.yaml (docs/experiments.md).

`python -m cvae_pipeline.commands.tune run [--trials N] [--jobs K]`: the study of tune.yaml to its budget, on K
workers here (`tuning.study`). `apply [--trial N]`: the best trial's varied params (or trial N's) at params.yaml's
full budget, as a DVC experiment. `dashboard`: optuna-dashboard on the study's storage, on loopback by default.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cvae_pipeline.cli import MLFLOW_QUIET, end_process, stage_status
from cvae_pipeline.errors import ParamsError, UserInputError
from cvae_pipeline.tuning.space import DEFAULT_FILE, load_search


def run(args: argparse.Namespace) -> None:
    from cvae_pipeline.tuning.study import run_study  # Optuna, MLflow and pandas: after the files are validated

    search, base = load_search(args.file, args.params)
    run_study(search, base, Path.cwd(), args.trials or search.trials, args.jobs)


def value_for_dvc(value) -> str:
    """A param's value as `dvc exp run -S` reads it (YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def apply_arguments(args: argparse.Namespace) -> list[str]:
    """`dvc exp run` of the chosen trial's varied params on params.yaml, at its full budget (no `fixed`)."""
    import optuna
    from optuna.trial import TrialState

    from cvae_pipeline.tuning.report import best_trials
    from cvae_pipeline.tuning.storage import open_storage, shown_storage

    search, _ = load_search(args.file, args.params)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    root = Path.cwd()
    try:
        study = optuna.load_study(study_name=search.study, storage=open_storage(root))
    except KeyError:
        raise UserInputError(f"no study {search.study!r} in {shown_storage()}; run make tune first") from None
    complete = {trial.number: trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if args.trial is not None:
        if args.trial not in complete:
            raise UserInputError(f"TRIAL={args.trial}: not a complete trial of study {search.study!r} (complete: "
                                 f"{', '.join(map(str, sorted(complete))) or 'none'})")
        trial = complete[args.trial]
    else:
        best = best_trials(study)
        if len(best) != 1:
            raise UserInputError(f"study {search.study!r}: " + (
                "no complete trial yet" if not best else "two objectives, no single best: choose one of the Pareto "
                f"front with TRIAL= ({', '.join(str(trial.number) for trial in best)}; reports/tune.md)"))
        trial = best[0]
    settings = [f"{key}={value_for_dvc(value)}" for key, value in trial.params.items()]
    return ["dvc", "exp", "run", "-n", f"{search.study}-trial-{trial.number}",
            *[word for setting in settings for word in ("-S", setting)]]


def apply(args: argparse.Namespace) -> None:
    command = apply_arguments(args)
    print("tune-apply:", " ".join(command), file=sys.stderr, flush=True)
    status = subprocess.run(command).returncode
    if status:
        raise UserInputError(f"tune-apply: dvc exp run exited with {status}")


def dashboard(args: argparse.Namespace) -> None:
    from cvae_pipeline.tuning.storage import JOURNAL, storage_url

    url = storage_url()
    target = [url] if url else [str(Path.cwd() / JOURNAL), "--storage-class", "JournalFileStorage"]
    if not url and not (Path.cwd() / JOURNAL).is_file():
        raise UserInputError(f"{JOURNAL}: no study here yet; run make tune first")
    print(f"tune-dashboard: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    os.execvp("optuna-dashboard", ["optuna-dashboard", *target, "--host", args.host, "--port", str(args.port),
                                   "--quiet"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=DEFAULT_FILE, help="the search (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="every trial's base (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("run", help="run the study to its budget")
    tune.add_argument("--trials", type=int, default=None, help="the budget (default: tune.yaml's trials)")
    tune.add_argument("--jobs", type=int, default=1, help="parallel workers here, at most the cores")
    chosen = commands.add_parser("apply", help="the best trial (or --trial) as a DVC experiment at the full budget")
    chosen.add_argument("--trial", type=int, default=None)
    served = commands.add_parser("dashboard", help="optuna-dashboard on the study's storage")
    served.add_argument("--host", default="127.0.0.1")
    served.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    if args.command == "run" and args.trials is not None and args.trials < 1:
        raise ParamsError(f"TRIALS={args.trials}: the budget must be a positive integer")
    {"run": run, "apply": apply, "dashboard": dashboard}[args.command](args)


if __name__ == "__main__":
    # cli.run_stage but for its bar on scikit-learn, which Optuna's parameter importances (fANOVA) use.
    for variable, value in MLFLOW_QUIET.items():
        os.environ.setdefault(variable, value)
    end_process(stage_status("tune", main))

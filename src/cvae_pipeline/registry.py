"""Promote the best trained model: a new version of a registered model, with the alias `champion` pointing at it.

`python -m cvae_pipeline.registry [--sweep NAME]` (`make promote`, `make promote SWEEP=latent`) looks at the finished
runs of `tracking.experiment` (of one sweep: runs tagged `sweep=NAME`) that hold evaluate's test ELBO (`eval_elbo`)
and a logged model (their own, or, for a follow-up run, its training's: tag `training_model_uri`). The best by test
ELBO becomes a new version of `registry.model_name` (MLflow 3 aliases, not the deprecated stages), unless `champion`
already points at its model. `models:/<name>@champion` then loads and serves it.
"""

import argparse
from dataclasses import dataclass

from cvae_pipeline import tracking
from cvae_pipeline.cli import run_stage
from cvae_pipeline.config import DEFAULT_PARAMS_FILE, load_params
from cvae_pipeline.errors import UserInputError

ALIAS = "champion"
SCORE = "eval_elbo"
MODELS = "models:/"


@dataclass(frozen=True)
class Candidate:
    run_id: str
    run_name: str
    score: float
    model_id: str  # the logged model's id: its URI is models:/<model_id>


def candidates(session: tracking.Session, sweep: str | None) -> list[Candidate]:
    """The finished runs of the session's experiment with a test ELBO and a model, best first."""
    query = f"attributes.status = 'FINISHED' and metrics.{SCORE} > -1e300"
    if sweep:
        query += f" and tags.sweep = '{sweep}'"
    found = []
    for run in session.search_runs(query):
        model = session.training_model(run.info.run_id)
        uri = model.model_uri if model else run.data.tags.get("training_model_uri", "")
        if uri.startswith(MODELS):
            found.append(Candidate(run.info.run_id, run.info.run_name, run.data.metrics[SCORE], uri[len(MODELS):]))
    return sorted(found, key=lambda candidate: candidate.score, reverse=True)


def promote(session: tracking.Session, model_name: str, sweep: str | None = None) -> str:
    """Register the best candidate's model as `model_name`@champion; returns what was done, in one line."""
    import mlflow

    session.connect()
    mlflow.set_tracking_uri(session.uri)
    ranked = candidates(session, sweep)
    scope = f"experiment {session.cfg.experiment}" + (f", sweep {sweep}" if sweep else "")
    if not ranked:
        raise UserInputError(f"no finished run in {scope} has evaluate's {SCORE} and a logged model: run "
                             "`make repro` (or a sweep) first")
    best = ranked[0]
    why = (f"{SCORE} {best.score:.2f}, the best of {len(ranked)} finished run(s) with an evaluation in {scope}"
           + (f" (next: {ranked[1].score:.2f}, run {ranked[1].run_name})" if len(ranked) > 1 else ""))
    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, ALIAS)
    except mlflow.exceptions.MlflowException:
        current = None
    # A version records the model as its source (models:/<id>); some stores also fill in its model_id.
    if current is not None and best.model_id in (current.model_id, current.source.removeprefix(MODELS)):
        return f"{model_name}@{ALIAS} is already version {current.version}, the model of run {best.run_name}: {why}"
    version = mlflow.register_model(MODELS + best.model_id, model_name,
                                    tags={"run_id": best.run_id, SCORE: f"{best.score:.6g}"})
    client.set_registered_model_alias(model_name, ALIAS, version.version)
    return (f"registered {model_name} version {version.version} from run {best.run_name} ({best.run_id}): {why}; "
            f"{model_name}@{ALIAS} -> version {version.version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--sweep", help="only the runs of this sweep (tag sweep), e.g. the S of a make sweep")
    args = parser.parse_args()
    params = load_params(args.params)
    print(promote(tracking.Session(params.tracking), params.registry.model_name, args.sweep))


if __name__ == "__main__":
    run_stage("promote", main)

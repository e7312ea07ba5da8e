"""Promote the best trained model: a new version of a registered model, with the alias `champion` pointing at it.

`make promote` (`commands.promote`) looks at the finished runs of `tracking.experiment` (of one sweep: runs tagged
`sweep=NAME`) that hold evaluate's validation ELBO (`eval_validation_elbo`) and a logged model (their own, or, for a
follow-up run, its training's: tag `training_model_uri`). The best by validation ELBO becomes a new version of
`registry.model_name` (MLflow 3 aliases, not the deprecated stages), unless `champion` already points at its model.
`models:/<name>@champion` then loads and serves it. The test set never chooses: a run without a validation set
(`data.validation_size: 0`) is not a candidate, and the champion's test ELBO stays an unbiased estimate.
"""

from dataclasses import dataclass

from cvae_pipeline import scores
from cvae_pipeline.errors import UserInputError
from cvae_pipeline.tracking.session import Session

ALIAS = "champion"
SCORE = scores.evaluated(scores.VALIDATION, scores.ELBO)
MODELS = "models:/"


@dataclass(frozen=True)
class Candidate:
    run_id: str
    run_name: str
    score: float
    model_id: str  # the logged model's id: its URI is models:/<model_id>


def candidates(session: Session, sweep: str | None) -> list[Candidate]:
    """The finished runs of the session's experiment with a validation ELBO and a model, best first."""
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


def promote(session: Session, model_name: str, sweep: str | None = None) -> str:
    """Register the best candidate's model as `model_name`@champion; returns what was done, in one line."""
    ranked = candidates(session, sweep)
    scope = f"experiment {session.cfg.experiment}" + (f", sweep {sweep}" if sweep else "")
    if not ranked:
        raise UserInputError(f"no finished run in {scope} has evaluate's {SCORE} and a logged model: run "
                             "`make repro` (or a sweep) first, with a validation set (data.validation_size > 0)")
    best = ranked[0]
    why = (f"{SCORE} {best.score:.2f}, the best of {len(ranked)} finished run(s) with an evaluation in {scope}"
           + (f" (next: {ranked[1].score:.2f}, run {ranked[1].run_name})" if len(ranked) > 1 else ""))
    current = session.call(lambda client: _champion(client, model_name))
    # A version records the model as its source (models:/<id>); some stores also fill in its model_id.
    if current is not None and best.model_id in (current.model_id, current.source.removeprefix(MODELS)):
        return f"{model_name}@{ALIAS} is already version {current.version}, the model of run {best.run_name}: {why}"
    version = session.call(lambda client: _register(client, model_name, best))
    return (f"registered {model_name} version {version.version} from run {best.run_name} ({best.run_id}): {why}; "
            f"{model_name}@{ALIAS} -> version {version.version}")


def _champion(client, model_name: str):
    """The version `champion` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _register(client, model_name: str, best: Candidate):
    """A new version of `model_name` (created if new) holding the candidate's logged model, aliased `champion`:
    what `mlflow.register_model("models:/<id>", ...)` does, then the alias."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(model_name, MODELS + best.model_id, model_id=best.model_id,
                                          tags={"run_id": best.run_id, SCORE: f"{best.score:.6g}"})
    client.set_registered_model_alias(model_name, ALIAS, version.version)
    return version

"""A study in MLflow: one parent run for the study, and under it each trial's run, which its train stage opens.

The parent run's id is kept in the study (`mlflow_run_id`, a user attribute), so every machine that joins the study
nests its trials under the same parent. A trial's run carries the tags `study`, `study_run_id`, `trial`, `machine` and,
once it ends, `state` and `reason`; a pruned or stopped trial's run ends KILLED, a failed one's FAILED. (Not
optuna-integration's MLflowCallback, which logs a trial's params and value from the worker once it ended: here the
trial's own train stage records its run as every training does, per-epoch curve, model and system metrics included.)
"""

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cvae_pipeline.tracking.session import Session
from cvae_pipeline.tracking.store import HOST

PARENT_ATTR = "mlflow_run_id"
PARENT_WAIT_SECONDS = 30  # how long a machine that joins a study waits for its creator to name the study's run
STATUS = {"complete": "FINISHED", "pruned": "KILLED", "stopped": "KILLED", "failed": "FAILED"}
ENDED = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


class StudyRecord:
    """The study's MLflow runs, through the session of the tracking store that the pipeline's stages use."""

    def __init__(self, session: Session, study: optuna.Study, storage: str):
        self.session, self.study, self.storage = session, study, storage
        self.run_id: str | None = None

    @contextlib.contextmanager
    def parent_run(self, tags: dict[str, str], created: bool = True) -> Iterator[None]:
        """The study's run, open while this machine works on it: made by the machine that `created` the study, found
        by the others through the study (they wait for it a little, when they started together); FINISHED at the end,
        KILLED on Ctrl-C, FAILED on an error."""
        known = self.study.user_attrs.get(PARENT_ATTR)
        if not known and not created and not self.study.trials:  # its creator started at the same time
            known = self._wait_for_parent()
        if known and self.session.get_run(known) is None:
            known = None  # another MLflow store: the study gets a parent run in this one
        tags = {**tags, "study": self.study.study_name, "optuna_storage": self.storage, "kind": "study"}
        with self.session.open_run(known, f"study-{self.study.study_name}", tags) as run:
            self.run_id = run.info.run_id if run is not None else None
            if self.run_id and self.run_id != known:
                self.study.set_user_attr(PARENT_ATTR, self.run_id)
            yield

    def _wait_for_parent(self) -> str | None:
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while True:
            known = self.study.user_attrs.get(PARENT_ATTR)
            if known or time.monotonic() > deadline:
                return known
            time.sleep(0.5)

    def trial_tags(self, number: int) -> dict[str, str]:
        tags = {"study": self.study.study_name, "trial": str(number), "machine": HOST}
        if self.run_id:
            tags.update({"mlflow.parentRunId": self.run_id, "study_run_id": self.run_id})
        return tags

    def trial_run_id(self, number: int) -> str | None:
        if not self.run_id:
            return None
        found = self.session.search_runs(f"tags.study_run_id = '{self.run_id}' and tags.trial = '{number}'")
        return found[0].info.run_id if found else None

    def end_trial(self, number: int, state: str, reason: str = "", run_id: str | None = None) -> None:
        """Tag the trial's run with how it ended, and end it so (its stage ended it already, unless it crashed)."""
        run_id = run_id or self.trial_run_id(number)
        if run_id is None:
            return
        tags = {"state": state, **({"reason": reason[:5000]} if reason else {})}

        def end(client) -> None:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            if state != "complete":
                client.set_terminated(run_id, STATUS[state])

        self.session.call(end)

    def close_abandoned(self, reason_attr: str) -> list[int]:
        """End, with their trial's state and reason, the trial runs that no worker ended: a worker killed with -9 (or a
        machine that went down) could not, and Optuna has since failed the trial (the run may still be RUNNING, or
        KILLED by the next stage that opened the store here). The trials whose runs it ended."""
        if not self.run_id:
            return []
        ended = []
        for run in self.session.search_runs(f"tags.study_run_id = '{self.run_id}'"):
            number = int(run.data.tags.get("trial", -1))
            trial = self.study.trials[number] if 0 <= number < len(self.study.trials) else None
            if "state" not in run.data.tags and trial is not None and trial.state in ENDED:
                self.end_trial(number, ENDED[trial.state], trial.user_attrs.get(reason_attr) or "its worker died",
                               run.info.run_id)
                ended.append(number)
        return ended

    def log_progress(self, step: int, metrics: dict[str, float]) -> None:
        """The study's best so far, after `step` trials, on the parent run."""
        self.session.log_metrics(metrics, step=step)

    def log_report(self, paths: list[Path]) -> None:
        self.session.log_artifacts(paths, "tune")

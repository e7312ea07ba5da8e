"""`make tune`: a study run to its budget on this machine's workers, shown as it goes, reported and recorded.

Before any trial: tune.yaml and params.yaml are validated, the data the trials train on is ready (the workspace's
prepared file, or one made for the fixed `data.*` settings), the study is created or loaded, and trials that a dead
worker on this machine left RUNNING are failed and queued again. The study's MLflow run is open while the workers
train; its report and figures land on it at the end, and on Ctrl-C too.
"""

import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

import optuna
from tqdm import tqdm

from cvae_pipeline.config import parse_params
from cvae_pipeline.data import load_manifest, prepare, save_prepared
from cvae_pipeline.errors import ParamsError, TrainingError
from cvae_pipeline.tracking.session import Session
from cvae_pipeline.tuning.records import StudyRecord
from cvae_pipeline.tuning.report import REPORT, best_trials, write_report
from cvae_pipeline.tuning.space import Search
from cvae_pipeline.tuning.storage import REASON_ATTR, fail_dead_trials, open_storage, shown_storage
from cvae_pipeline.tuning.trial import Outcome, pipeline_paths
from cvae_pipeline.tuning.workers import Workers, counted

log = logging.getLogger(__name__)

PREPARED_FOLDER = Path(".tune") / "data"


def trial_data(search: Search, base: dict, root: Path) -> Path:
    """The prepared file the trials train on: the workspace's (dvc.yaml's `prepared`) when they take params.yaml's
    data settings, else one prepared here, once, for tune.yaml's fixed `data.*`."""
    paths = pipeline_paths(root)
    data = search.trial_params(base, {}, "tune.yaml: fixed")[0].data
    if data == parse_params(json.dumps(base), "params.yaml").data:
        prepared = root / paths["prepared"]
        if not prepared.is_file():
            raise ParamsError(f"{prepared}: not found; run `dvc repro prepare` first (make tune does)")
        return prepared
    digest = hashlib.sha256(json.dumps(data.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    prepared = root / PREPARED_FOLDER / f"mnist-{digest}.npz"
    if not prepared.is_file():
        settings = ", ".join(f"data.{key}: {value}" for key, value in data.model_dump().items())
        log.info("preparing the trials' data (%s) in %s", settings, prepared.relative_to(root))
        save_prepared(prepare(load_manifest(root / paths["manifest"]), root / paths["raw"], data), prepared)
    return prepared


def open_study(search: Search, storage) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it (its creator gives it its MLflow run: `StudyRecord.parent_run`).
    Creating is atomic in every storage: of several machines that start together, one creates it."""
    try:
        return optuna.create_study(study_name=search.study, storage=storage, directions=search.directions), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=search.study, storage=storage)
    if [direction.name.lower() for direction in study.directions] != search.directions:
        raise ParamsError(f"tune.yaml: study {search.study!r} exists with other objectives; name a new study")
    return study, False


class Progress:
    """The study as it goes: a bar on a terminal (trials done of the budget, pruned, failed, running, the best so far)
    and, on a terminal or in a log, one line per trial that ends, with the same counts."""

    def __init__(self, study: optuna.Study, search: Search, budget: int, record: StudyRecord):
        self.study, self.search, self.budget, self.record = study, search, budget, record
        self.bar = tqdm(total=budget, unit="trial", file=sys.stderr, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.lock = threading.Lock()
        self.logged_best = None

    def __enter__(self) -> "Progress":
        self.update()
        self.thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self.done.set()
        self.thread.join()
        self.update()
        self.bar.close()

    def _follow(self) -> None:
        while not self.done.wait(2.0):
            self.update()

    def update(self) -> str:
        """Refresh the bar and the best-so-far metric of the study's run; the counts, as one line."""
        trials = counted(self.study.get_trials(deepcopy=False))
        states = [trial.state.name.lower() for trial in trials]
        finished = sum(state in ("complete", "pruned", "fail") for state in states)
        best = best_trials(self.study)
        single = not self.search.pareto
        shown = (f"best {best[0].values[0]:.2f} (trial {best[0].number})" if best and single else
                 f"{len(best)} on the Pareto front" if best else "none complete yet")
        counts = (f"{states.count('pruned')} pruned, {states.count('fail')} failed, {states.count('running')} "
                  f"running, {shown}")
        with self.lock:
            self.bar.set_postfix_str(counts, refresh=False)
            self.bar.update(finished - self.bar.n)
            if best and single and best[0].number != self.logged_best:
                self.logged_best = best[0].number
                self.record.log_progress(finished, {f"best_{self.search.objectives[0]}": best[0].values[0]})
        return f"{finished} of {self.budget} done: {counts}"

    def trial_ended(self, number: int, outcome: Outcome) -> None:
        shown = (", ".join(f"{name} {outcome.metrics[name]:.2f}" for name in self.search.objectives)
                 if outcome.metrics else outcome.reason)
        line = f"tune: trial {number} {outcome.state}: {shown}"
        if self.bar.disable:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def trial_counted(self) -> None:
        """After a trial's state is stored: the counts, as a line in a log (the bar shows them on a terminal)."""
        counts = self.update()
        if self.bar.disable:
            print(f"tune: {counts}", file=sys.stderr, flush=True)


def run_study(search: Search, base: dict, root: Path, budget: int, jobs: int) -> list[Path]:
    """Run the study to `budget` trials on `jobs` workers; the report's files."""
    cores = os.cpu_count() or 1
    if not 1 <= jobs <= cores:
        raise ParamsError(f"J={jobs}: the workers must number 1 to this machine's {cores} cores")
    params = parse_params(json.dumps(base), "params.yaml")
    prepared = trial_data(search, base, root)
    storage, shown = open_storage(root), shown_storage()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress line and each trial's line say it all
    study, created = open_study(search, storage)
    fail_dead_trials(study)
    session = Session(params.tracking)
    session.connect()
    record = StudyRecord(session, study, shown)
    log.info("study %s in %s: %d of %d trials counted so far, %d worker(s) here; each trial's output is in "
             ".tune/trials/%s/", search.study, shown, len(counted(study.trials)), budget, jobs, search.study)
    with record.parent_run({"trials": str(budget)}, created):
        record.close_abandoned(REASON_ATTR)
        progress = Progress(study, search, budget, record)
        workers = Workers(search, base, root, storage, prepared, record, budget, jobs, progress.trial_ended,
                          progress.trial_counted)
        try:
            with progress:
                workers.run()
        finally:
            record.close_abandoned(REASON_ATTR)  # another machine's worker that died while this one worked
            files = write_report(study, search, root, shown, budget)
            record.log_report(files)
            log.info("report: %s", files[0].relative_to(root))
        if not best_trials(study):  # the budget spent, and nothing to show for it: not a success
            raise TrainingError(f"study {search.study}: no trial completed; {REPORT} gives each one's reason")
    return files

"""Where a study lives, and the trials that its workers left RUNNING when they died.

One machine: Optuna's journal file `.tune/optuna.journal` (its parallel writers take turns on a lock; SQLite's would
fail with "database is locked"). Several machines: `OPTUNA_STORAGE` names a database that every machine reaches, e.g.
`postgresql://optuna@db.internal:5432/optuna` (a database of its own: Optuna and MLflow each keep an `alembic_version`
table), its password in `PGPASSWORD` or `~/.pgpass`, never in the URL. There, Optuna's heartbeat finds a trial whose
worker died, on any machine, and queues its params again; with the journal file, the next `make tune` on this machine
does the same for trials whose worker process is gone.
"""

import logging
import os
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from cvae_pipeline.errors import ParamsError
from cvae_pipeline.tracking.store import HOST, holds_password, shown

log = logging.getLogger(__name__)

STORAGE_ENV = "OPTUNA_STORAGE"
JOURNAL = Path(".tune") / "optuna.journal"
HEARTBEAT_SECONDS = 20  # a worker's heartbeat, while it runs a trial ...
GRACE_SECONDS = 90      # ... and how long without one before another worker fails the trial and queues it again
SCHEMA_ATTEMPTS = 3     # tries to open a new database whose tables another machine is creating

# A trial's user attributes: where its worker runs, and why it ended as it did.
HOST_ATTR, PID_ATTR, REASON_ATTR = "host", "worker_pid", "reason"
with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 2.8
    RETRY = RetryHeartbeatStaleTrialCallback(max_retry=3)


def storage_url() -> str | None:
    """The database URL of `OPTUNA_STORAGE`, checked; None for the default journal file."""
    url = os.environ.get(STORAGE_ENV, "").strip()
    if not url:
        return None
    if holds_password(url):
        raise ParamsError(f"{STORAGE_ENV} holds a password, which ps, logs and the shell's history would show; leave "
                          "it out of the URL and export PGPASSWORD (or use ~/.pgpass)")
    if url.startswith("sqlite"):
        raise ParamsError(f"{STORAGE_ENV}={url}: SQLite fails under parallel workers (\"database is locked\"); unset "
                          f"it for this machine's journal file {JOURNAL}, or name a PostgreSQL database")
    return url


def shown_storage() -> str:
    """The storage as messages and the report name it: the database URL without a password, or the journal file."""
    url = storage_url()
    return shown(url) if url else str(JOURNAL)


def open_storage(root: Path) -> optuna.storages.BaseStorage:
    """The study's storage: `OPTUNA_STORAGE`'s database, or the journal file under `root`."""
    url = storage_url()
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        (root / JOURNAL).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(root / JOURNAL)))
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return _database(url)
        except Exception as error:  # SQLAlchemy's and the driver's errors: a wrong host, user, password or database
            if attempt + 1 < SCHEMA_ATTEMPTS and _schema_race(error):
                time.sleep(2.0)  # another machine is creating Optuna's tables in this new database: they will be there
                continue
            what = " ".join(str(error).split())[:300]
            raise ParamsError(f"{STORAGE_ENV}={shown(url)}: cannot open the study's database ({what})") from None
    raise AssertionError("unreachable")


def _database(url: str) -> optuna.storages.RDBStorage:
    # pool_pre_ping: a worker that trained for an hour finds its idle connection closed by the server.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                          heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                          heartbeat_stale_trial_callback=RETRY)


def _schema_race(error: Exception) -> bool:
    """Two machines that create Optuna's tables in a new database at once: one of them fails on what the other made."""
    import sqlalchemy.exc

    return isinstance(error, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError) and (
        "already exists" in str(error) or "duplicate key" in str(error))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fail the trials left RUNNING on this host by a worker process that is gone (a kill -9, a crash, a reboot), and
    queue each one's params again. The failed trials."""
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(PID_ATTR)
        if trial.user_attrs.get(HOST_ATTR) != HOST or not isinstance(pid, int) or _alive(pid):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, f"its worker (pid {pid} on {HOST}) died")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        failed = study._storage.get_trial(trial._trial_id)
        RETRY(study, failed)
        log.warning("trial %d was left RUNNING by worker %d on %s, which died: failed, its params queued again",
                    trial.number, pid, HOST)
        dead.append(failed)
    return dead

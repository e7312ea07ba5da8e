"""Writes to a tracking server that went away in the middle of a stage (a restart, an upgrade, a crash): kept in order
and sent once it answers again, so that the run ends up with every epoch, the model and the figures, once each.

Every write the session hands over is idempotent (a metric already held is not logged again, a model already logged is
not logged twice, an artifact replaces itself), so one that reached the server before its answer was lost does no
harm when it is sent again.
"""

import itertools
import logging
import threading
from collections.abc import Callable

from cvae_pipeline.tracking.store import is_server, shown, unanswered

log = logging.getLogger(__name__)

# The error codes by which MLflow's client says a server did not answer (its retries exhausted) or failed for now.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def transient(error: BaseException) -> bool:
    """Whether `error` may be a server that is away rather than a request it refused."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in _TRANSIENT_CODES
    return isinstance(error, OSError)  # requests' connection errors, from an artifact upload


class Outbox:
    """The writes of one stage to the server at `uri`, sent in order; while the server is away, kept until it
    answers. Safe to use from several threads (training logs each epoch on its checkpoint thread)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.away = False
        self._pending: dict[str, tuple[str, Callable[[], None]]] = {}
        self._numbers = itertools.count()
        self._lock = threading.RLock()

    @property
    def missing(self) -> list[str]:
        """What the writes still waiting would log ("epoch 3", "model", ...), oldest first."""
        with self._lock:
            return [what for what, _ in self._pending.values()]

    def lacking(self, run_id: str) -> str | None:
        """What run `run_id` lacks while the server is away, in a sentence; None when nothing waits."""
        missing = self.missing
        if not missing:
            return None
        return (f"MLflow server {shown(self.uri)} went away during the stage and has not come back: run {run_id} "
                f"lacks {', '.join(dict.fromkeys(missing))}")

    def send(self, what: str, write: Callable[[], None]) -> None:
        """Send `write` after whatever waits; while the server is away, keep it. Raises what the write raised when
        that is not the server being away (a refused request, a bug)."""
        with self._lock:
            self._pending[f"{next(self._numbers)}:{what}"] = (what, write)
            self.flush()

    def flush(self) -> None:
        """Send what waits, oldest first, if the server answers (asked once, without MLflow's retries)."""
        with self._lock:
            if self.away:
                if unanswered(self.uri, attempts=1) is not None:
                    return
                log.warning("MLflow server %s answers again: logging what it missed (%s)", shown(self.uri),
                            ", ".join(self.missing))
                self.away = False
            retried = False
            while self._pending:
                key, (what, write) = next(iter(self._pending.items()))
                try:
                    write()
                except Exception as error:
                    if not (is_server(self.uri) and transient(error)):
                        self._pending.clear()
                        raise
                    problem = unanswered(self.uri, attempts=1)
                    if problem is None and not retried:  # back already, as MLflow's retries gave up: once more
                        retried = True
                        continue
                    if problem is None:  # it answers, and still fails this write: not an absence
                        self._pending.clear()
                        raise
                    self.away = True
                    log.warning("MLflow server %s went away while logging %s (%s); going on, and logging what it "
                                "misses once it answers", shown(self.uri), what, problem)
                    return
                retried = False
                del self._pending[key]

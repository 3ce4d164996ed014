"""`tasks.restore`: restore a backup on this worker's host (the CLI has already asked for confirmation).

The protocol with the command that sent it, and that command's half (follow, stop), are in
pgbeat.restore.on_worker.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from celery import shared_task

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.errors import EXIT_FAILED, PgbeatError
from pgbeat.restore.on_worker import worker_heartbeat
from pgbeat.restore.restore import restore as restore_backup
from pgbeat.settings import get_settings
from pgbeat.startup import recover_host
from pgbeat.steps.verify import open_backup
from workers.config import task_label


def shown_as(task, args, kwargs, options):
    """`restore erp` in Flower and `celery events` (Celery's shadow name); the CLI names it so too."""
    return task_label("restore", args[1]) if len(args or ()) >= 2 else None


# Never redelivered nor retried (the app's task_retry_on_worker_lost would send it again 180 s after its
# pool process died): a restore interrupted by a dying worker leaves the database as it was, and a person,
# not a broker, decides whether to run it again. Celery then marks it failed, which the command following
# it sees at once.
@shared_task(name="tasks.restore", bind=True, acks_late=False, retry_on_worker_lost=False, shadow_name=shown_as)
def restore(self, path: str, target: str, into: str | None = None, jobs: int = 2, with_globals: bool = False,
            force_older: bool = False) -> dict:
    """Restore `path` into `target` (or database `into`), reporting each stage in the run state; with
    `with_globals`, apply the backup's globals first; `force_older` restores into an older major."""
    settings = get_settings()
    state = RunState(redis_client(settings))
    run_id = self.request.id
    if not state.once(run_id, "start"):
        return {"cancelled": "the command that sent this restore gave up on it before a worker took it"}
    recover_host(settings, "restore")
    state.update(run_id, status="running", step="verify", target=target, kind="restore", node=settings.node)
    beating = threading.Event()
    threading.Thread(target=_beat, args=(state, run_id, worker_heartbeat(settings)[0], beating), daemon=True,
                     name="pgbeat-restore-heartbeat").start()

    def progress(step: str, what: str) -> None:
        state.update(run_id, status="running", step=step)
        state.progress(run_id, f"{step} {what}")

    try:
        entry = open_backup(Path(path))
        result = restore_backup(settings, entry, settings.target(target), into=into, jobs=jobs,
                                confirm=lambda info: True, on_step=progress, with_globals=with_globals,
                                force_older=force_older)
    except BaseException as exc:  # whatever it is, the run ends as failed (restore() undid its work)
        failure = exc.to_json() if isinstance(exc, PgbeatError) else {
            "error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}", "details": []}
        state.update(run_id, status="failed",
                     failure={**failure, "exit_code": getattr(exc, "exit_code", EXIT_FAILED)})
        raise
    finally:
        beating.set()
    summary = {"database": result.database, "safety_backup": str(result.safety_backup or ""),
               "duration_s": result.duration_s, "tables_checked": result.tables_checked}
    state.update(run_id, status="succeeded", step="done", **summary)
    return summary


def _beat(state: RunState, run_id: str, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        with contextlib.suppress(Exception):  # a missed beat is only that; the CLI decides what silence means
            state.update(run_id, heartbeat=time.time())

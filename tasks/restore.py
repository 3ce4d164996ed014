"""`tasks.restore`: restore a backup on this worker's host (the CLI has already asked for confirmation)."""

from pathlib import Path

from celery import shared_task

from pgbeat.coordination import RunState
from pgbeat.errors import PgbeatError
from pgbeat.restore import restore as restore_backup
from pgbeat.settings import get_settings
from pgbeat.verify import open_backup
from workers.chain import redis_client


# Never redelivered: a restore interrupted by a dying worker leaves the database as it was, and a
# person, not a broker, decides whether to run it again.
@shared_task(name="tasks.restore", bind=True, acks_late=False)
def restore(self, path: str, target: str, into: str | None = None, jobs: int = 2) -> dict:
    """Restore `path` into `target` (or database `into`), reporting each stage in the run state."""
    settings = get_settings()
    state = RunState(redis_client(settings))
    run_id = self.request.id
    state.update(run_id, status="running", step="verify", target=target, kind="restore")

    def progress(step: str, what: str) -> None:
        state.update(run_id, status="running", step=step)
        state.progress(run_id, f"{step} {what}")

    try:
        entry = open_backup(Path(path))
        result = restore_backup(settings, entry, settings.target(target), into=into, jobs=jobs,
                                confirm=lambda info: True,
                                on_step=lambda step, what: progress(step, what))
    except PgbeatError as exc:
        state.update(run_id, status="failed", failure={**exc.to_json(), "exit_code": exc.exit_code})
        raise
    summary = {"database": result.database, "safety_backup": str(result.safety_backup or ""),
               "duration_s": result.duration_s, "tables_checked": result.tables_checked}
    state.update(run_id, status="succeeded", step="done", **summary)
    return summary

"""`tasks.restore`: restore a backup on this worker's host (the CLI has already asked for confirmation),
and `follow`, the CLI's half: what the run state in Redis says, so that the CLI never waits forever.

The protocol, in the run's state (pgbeat.coordination.runs.RunState): the worker claims the run once
(`once(run, "start")`) before it begins; the CLI claims it instead when it gives up on a run no worker
took, so that run never starts. While it runs, the task beats (`updated_at`) every `heartbeat` seconds;
it ends "succeeded" or "failed" (with the message), whatever the exception.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery import shared_task

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import NodeRegistry, RunState
from pgbeat.errors import EXIT_FAILED, PgbeatError
from pgbeat.restore.restore import restore as restore_backup
from pgbeat.settings import Settings, get_settings
from pgbeat.startup import recover_host
from pgbeat.steps.verify import open_backup


def worker_heartbeat(settings: Settings) -> tuple[float, float]:
    """Return (how often a running restore beats, how long a silent one is taken for dead), in seconds:
    the same liveness as a target lock's (`reliability.lock_ttl`)."""
    ttl = settings.reliability.lock_ttl
    return max(ttl / 3, 0.5), 2.0 * ttl


# Never redelivered nor retried (the app's task_retry_on_worker_lost would send it again 180 s after its
# pool process died): a restore interrupted by a dying worker leaves the database as it was, and a person,
# not a broker, decides whether to run it again. Celery then marks it failed, which `follow` sees at once.
@shared_task(name="tasks.restore", bind=True, acks_late=False, retry_on_worker_lost=False)
def restore(self, path: str, target: str, into: str | None = None, jobs: int = 2) -> dict:
    """Restore `path` into `target` (or database `into`), reporting each stage in the run state."""
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
                                confirm=lambda info: True, on_step=progress)
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


@dataclass
class Outcome:
    """How a followed restore ended: the exit code and the lines that say why."""

    exit_code: int
    lines: list[str] = field(default_factory=list)


def follow(app, settings: Settings, run_id: str, node: str, timeout: float,
           show: Callable[[str], None]) -> Outcome:
    """Follow restore run `run_id` sent to `node`'s queue, passing each progress line to `show`, until it
    ends, its worker is found dead or silent, no live worker is there to take it, or `timeout` seconds
    pass (then a started restore is stopped with SIGTERM, which undoes it); return how it ended."""
    state = RunState(redis_client(settings))
    _, silence = worker_heartbeat(settings)
    deadline = time.monotonic() + timeout
    printed = 0
    while True:
        fields = state.get(run_id)
        lines = state.progress_since(run_id, printed)
        printed += len(lines)
        for line in lines:
            show(line)
        status = fields.get("status")
        if status == "failed":
            failure = json.loads(fields.get("failure") or "{}")
            return Outcome(failure.get("exit_code", EXIT_FAILED), [
                failure.get("message", "restore failed"), *(f"  {d}" for d in failure.get("details", [])),
                *([f"HINT: {failure['hint']}"] if failure.get("hint") else [])])
        if status == "succeeded":
            return Outcome(0, [f"succeeded: {fields.get('database')} restored in {fields.get('duration_s')}s; "
                               f"safety backup {fields.get('safety_backup') or '-'}"])
        if status is None:  # no worker has taken it yet
            if node not in NodeRegistry(state.client).alive_nodes() and state.once(run_id, "start"):
                return Outcome(EXIT_FAILED, [f"No live worker on host {node} (none has a heartbeat in Redis): the "
                                             "restore was not started, and never will be",
                                             "HINT: start a worker there (celery -A workers.app worker), or name "
                                             "another host with --node"])
        elif app.AsyncResult(run_id).state == "FAILURE":  # its pool process died: Celery saw it, the task could not
            if state.get(run_id).get("status") in ("failed", "succeeded"):
                continue  # the task did end it, just after `fields` was read
            reason = app.AsyncResult(run_id).result
            state.update(run_id, status="failed", failure={"message": f"the worker died: {reason!r}"})
            return Outcome(EXIT_FAILED, [f"The worker process restoring on host {node} died "
                                         f"({type(reason).__name__}: {reason}); the original database is intact, "
                                         f"and the next pgbeat run on {node} drops the temporary database"])
        elif time.time() - float(fields.get("updated_at", time.time())) > silence:
            state.update(run_id, status="failed", failure={"message": "the worker stopped reporting"})
            return Outcome(EXIT_FAILED, [f"The worker restoring on host {node} has not reported for over "
                                         f"{silence:.0f} s: it died or lost Redis; the original database is intact, "
                                         f"and the next pgbeat run on {node} drops the temporary database"])
        if time.monotonic() > deadline:
            return Outcome(EXIT_FAILED, [stop(app, settings, run_id, f"Timed out after {timeout:.0f} s")])
        time.sleep(0.3)


def stop(app, settings: Settings, run_id: str, why: str) -> str:
    """Stop restore run `run_id`: one no worker took never starts; a running one gets SIGTERM, which
    makes it undo what it began. Return what happened, for the user."""
    state = RunState(redis_client(settings))
    if state.once(run_id, "start"):
        return f"{why}: the restore had not started on a worker, and now never will"
    app.control.revoke(run_id, terminate=True, signal="SIGTERM")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fields = state.get(run_id)
        if fields.get("status") in ("succeeded", "failed"):
            message = json.loads(fields.get("failure") or "{}").get("message", fields["status"])
            return f"{why}: the restore on the worker ended: {message}"
        time.sleep(0.2)
    return f"{why}: asked the worker to stop the restore (run {run_id}); `pgbeat status` there shows how it ends"

"""A restore run by `tasks.restore` on a worker's host, as the command that sent it sees it.

The protocol, in the run's state (pgbeat.coordination.runs.RunState): the worker claims the run once
(`once(run, "start")`) before it begins; the command claims it instead when it gives up on a run no
worker took, so that run never starts. While it runs, the task beats (`updated_at`) every `heartbeat`
seconds; it ends "succeeded" or "failed" (with the message), whatever the exception. The command follows
it with the one loop (pgbeat.coordination.follow), never forever.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgbeat.coordination import MANUAL_PRIORITY, redis_client
from pgbeat.coordination.dispatch import host_queue, send_task, task_failure, task_label, terminate_task
from pgbeat.coordination.follow import RunEnd, follow_runs
from pgbeat.coordination.runs import NodeRegistry, RunState
from pgbeat.errors import EXIT_FAILED, NoWorkerError, PgbeatError, UnreachableError, error_from_record
from pgbeat.restore.restore import RestoreInfo
from pgbeat.settings import Settings

if TYPE_CHECKING:
    from pgbeat.catalog.manifest import Entry


def worker_heartbeat(settings: Settings) -> tuple[float, float]:
    """Return (how often a running restore beats, how long a silent one is taken for dead), in seconds:
    the same liveness as a target lock's (`reliability.lock_ttl`)."""
    ttl = settings.reliability.lock_ttl
    return max(ttl / 3, 0.5), 2.0 * ttl


@dataclass
class Outcome:
    """How a followed restore ended: the exit code and the lines that say why."""

    exit_code: int
    lines: list[str] = field(default_factory=list)


def restore_on_worker(settings: Settings, entry: Entry, target: str, into: str | None, jobs: int,
                      node: str | None, timeout: float, confirm: Callable[[RestoreInfo], bool],
                      show: Callable[[str], None], with_globals: bool = False, force_older: bool = False) -> Outcome:
    """Given a checked backup `entry`, ask `confirm` here, send tasks.restore to `node`'s worker (default:
    this host's) and follow it, passing each progress line to `show`; return how it ended.

    Never waits forever (`follow`); SIGTERM, SIGHUP or Ctrl-C here stop the restore there too. Raise
    PgbeatError without a broker, RestoreRefused when not confirmed, UnreachableError if the broker goes
    away while the restore is followed (it may go on there).
    """
    import redis

    from pgbeat.restore.journal import Interrupted, interruptible
    from pgbeat.restore.restore import RestoreRefused

    if settings.embedded:
        raise PgbeatError("--on-worker needs a broker (CELERY_BROKER_URL)")
    node = node or settings.node
    config = settings.target(target)
    info = RestoreInfo.of(entry, config, into or config.dbname, exists=True)
    if not confirm(info):
        raise RestoreRefused("Restore cancelled: not confirmed", hint="type SIM to confirm, or pass --yes")
    run_id = send_restore(settings, str(entry.path), target, into, jobs, node, timeout, with_globals=with_globals,
                          force_older=force_older)
    try:
        with interruptible():
            return follow(settings, run_id, node, timeout, show)
    except Interrupted as exc:
        return Outcome(EXIT_FAILED, [stop(settings, run_id, f"Interrupted by {exc.signal_name}")])
    except redis.RedisError as exc:
        raise UnreachableError(f"Lost the broker while following restore run {run_id} ({type(exc).__name__}); it "
                               f"may go on on host {node}: `pgbeat status` there shows how it ends") from None


def send_restore(settings: Settings, path: str, target: str, into: str | None, jobs: int, node: str,
                 timeout: float, with_globals: bool = False, force_older: bool = False) -> str:
    """Send tasks.restore of `path` into `target` (or `into`) to `node`'s queue; return its run id."""
    task_id = uuid.uuid4().hex
    # `expires`: a message still queued after this command gave up is dropped by the worker that gets it.
    send_task(settings, "tasks.restore", [path, target, into, jobs, with_globals, force_older], task_id,
              shadow=task_label("restore", target),
              queue=host_queue(node), priority=MANUAL_PRIORITY, expires=timeout)
    return task_id


def follow(settings: Settings, run_id: str, node: str, timeout: float, show: Callable[[str], None]) -> Outcome:
    """Follow restore run `run_id` sent to `node`'s queue, passing each progress line to `show`, until it
    ends, its worker is found dead or silent, no live worker is there to take it, or `timeout` seconds
    pass (then a started restore is stopped with SIGTERM, which undoes it); return how it ended."""
    state = RunState(redis_client(settings))
    _, silence = worker_heartbeat(settings)
    said: dict[str, Outcome] = {}  # what the watch found, in the words the user reads

    def watch(run_id: str, fields: dict[str, str]) -> dict[str, str] | None:
        if fields.get("status") is None:  # no worker has taken it yet
            if node not in NodeRegistry(state.client).alive_nodes() and state.once(run_id, "start"):
                said[run_id] = Outcome(NoWorkerError.exit_code, [
                    f"No live worker on host {node} (none has a heartbeat in Redis): the restore was not "
                    "started, and never will be", "HINT: start a worker there (celery -A workers.app worker), "
                    "or name another host with --node"])
                return {"status": "failed"}
            return None
        died = task_failure(settings, run_id)
        if died is not None:  # its pool process died: Celery saw it, the task could not
            fields = state.get(run_id)
            if fields.get("status") in ("failed", "succeeded"):
                return fields  # the task did end it, just after `fields` was read
            state.update(run_id, status="failed", failure={"message": f"the worker died: {died!r}"})
            said[run_id] = Outcome(EXIT_FAILED, [
                f"The worker process restoring on host {node} died ({type(died).__name__}: {died}); the "
                f"original database is intact, and the next pgbeat run on {node} drops the temporary database"])
            return {"status": "failed"}
        if time.time() - float(fields.get("updated_at", time.time())) > silence:
            state.update(run_id, status="failed", failure={"message": "the worker stopped reporting"})
            said[run_id] = Outcome(EXIT_FAILED, [
                f"The worker restoring on host {node} has not reported for over {silence:.0f} s: it died or "
                f"lost Redis; the original database is intact, and the next pgbeat run on {node} drops the "
                "temporary database"])
            return {"status": "failed"}
        return None

    end = follow_runs(state, [run_id], timeout, show=lambda _, line: show(line), watch=watch, interval=0.3)[run_id]
    if run_id in said:
        return said[run_id]
    if end.timed_out:
        return Outcome(EXIT_FAILED, [stop(settings, run_id, f"Timed out after {timeout:.0f} s")])
    return outcome_of(end)


def outcome_of(end: RunEnd) -> Outcome:
    """Given how a restore run ended in its state, return its exit code and lines."""
    if end.status == "succeeded":
        fields = end.fields
        return Outcome(0, [f"succeeded: {fields.get('database')} restored in {fields.get('duration_s')}s; "
                           f"safety backup {fields.get('safety_backup') or '-'}"])
    error = error_from_record({"message": "restore failed", **end.failure})
    return Outcome(error.exit_code, error.render().splitlines())


def stop(settings: Settings, run_id: str, why: str) -> str:
    """Stop restore run `run_id`: one no worker took never starts; a running one gets SIGTERM, which
    makes it undo what it began. Return what happened, for the user."""
    state = RunState(redis_client(settings))
    if state.once(run_id, "start"):
        return f"{why}: the restore had not started on a worker, and now never will"
    terminate_task(settings, run_id, "SIGTERM")
    end = follow_runs(state, [run_id], 60)[run_id]
    if not end.timed_out:
        return f"{why}: the restore on the worker ended: {end.failure.get('message', end.status)}"
    return f"{why}: asked the worker to stop the restore (run {run_id}); `pgbeat status` there shows how it ends"

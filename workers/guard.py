"""Running one chain step under Celery's delivery rules: at most one copy at a time, done at least once.

Steps acknowledge late, so a step whose pool process died is delivered again (Celery retries it, or
Redis restores it after the visibility timeout). The steps themselves are idempotent given their record
(a step run again recognises what an earlier attempt did, see pgbeat.pipeline.runner). Around the core step
this guard:
- drops every message of a run the reconciler abandoned (it was dispatched anew on a live host), and
  every step but `notify` of a run that already failed for good (its errback has cleaned up);
- for a step that already finished: drops the copy if the chain went on, else passes the stored result
  on (the first delivery may have died before sending the next step); the work is never redone;
- gives the step a `once` claim in Redis, so a notify run again never sends an outcome twice;
- takes a per-(run, step) lease, so a twin delivered while the step runs waits and looks again after
  `lock_ttl` instead of running in parallel, and takes over only if the running copy dies; a lease left
  by a dead process on this host is taken over at once;
- counts deliveries, so a step that keeps killing its worker fails after `max_attempts`;
- holds the locks the step table declares for the step (the dump: the target lock and the per-server
  and fleet slots, renewed while pg_dump runs);
  a busy target or a full server makes the step wait by short re-sends (never a countdown longer than
  the visibility timeout, and not counted as a retry); a lost lock aborts pg_dump;
- maps failures through the runner contract (pgbeat.pipeline.runner.retry_delay): transient ones to
  retries with backoff, everything else to a chain failure (the errback notifies); a Redis outage to a
  requeue. The healthchecks start ping goes out, once, when the step that opens the run first arrives.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject
from redis.exceptions import RedisError

from pgbeat import faults
from pgbeat.coordination import redis_client
from pgbeat.coordination.leases import (
    GLOBAL_SLOTS_KEY,
    RedisLease,
    RedisSemaphore,
    holder_gone,
    host_slots_key,
    step_lease_key,
    target_lock_key,
)
from pgbeat.coordination.runs import RunState
from pgbeat.errors import LockHeldError, PgbeatError
from pgbeat.notify import Event, send_event
from pgbeat.pipeline.record import Run, StepContext
from pgbeat.pipeline.runner import announce_start, execute_step, redact, retry_delay
from pgbeat.pipeline.steps_table import STEPS, Step, step
from pgbeat.postgres.process import CancelEvent
from pgbeat.settings import Settings, get_settings
from workers.config import task_label

log = logging.getLogger(__name__)
STEP_STORED = {name: faults.declare(f"{name}.stored", f"the {name} step's result is stored in Redis; the next "
                                                      "step is not sent yet (Celery only)") for name in STEPS}


class StepTask(Task):
    """Base of the chain's step tasks."""

    acks_late = True
    reject_on_worker_lost = True
    retry_on_worker_lost = True
    default_retry_delay = 5  # after a lost pool process: retry soon, the step is idempotent
    max_retries = 5
    track_started = True

    def shadow_name(self, args, kwargs, options):
        """Shown as `dump erp/daily` (its step, target and tier) in Flower and `celery events`, every time
        the step is sent: in its chain, by the errback, when it is retried or waits for a lock."""
        record = (args or [{}])[0]
        if isinstance(record, dict) and record.get("target"):
            return task_label(self.name.removeprefix("tasks."), record["target"], record.get("tier"))
        return None


def run_step(task: Task, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Run step `name` of the run in `record` as described above; return the updated record.

    The rules of the step (locks, retries, whether it runs after a failure) are its row of the step
    table, applied through the runner contract (pgbeat.pipeline.runner), as in-process.
    """
    settings = get_settings()
    row = step(name)
    run = Run.model_validate(record)
    client = redis_client(settings)
    state = RunState(client)
    status = state.get(run.run_id).get("status")
    if status == "abandoned":
        # The reconciler gave this run up (its host was gone) and dispatched a new one: drop this copy.
        log.warning("%s of run %s: the run was abandoned and re-dispatched; dropping this message", name, run.run_id)
        raise Ignore()
    if status == "failed" and not row.always_runs:
        # A late copy (a retry sent before the run failed for good): the errback has cleaned up already.
        log.warning("%s of run %s: the run failed already; dropping this message", name, run.run_id)
        raise Ignore()
    done = state.step_result(run.run_id, name)
    if done is not None:
        if STEPS.index(state.get(run.run_id).get("step") or name) > STEPS.index(name):
            log.warning("%s of run %s: a copy of a finished step, the chain went on; dropping it", name, run.run_id)
            raise Ignore()
        # The first delivery finished but may have died before sending the next step: send it now.
        log.warning("%s of run %s already done: passing its result on", name, run.run_id)
        if row.always_runs:
            finish(state, Run.model_validate(done))
        return done
    ctx = StepContext(settings, cancel=CancelEvent(), once=lambda what: state.once(run.run_id, what))
    lease = RedisLease(client, step_lease_key(run.run_id, name), settings.reliability.lock_ttl, settings.node,
                       run.run_id, on_lost=lambda reason: ctx.cancel.cancel(f"lost the step lease: {reason}"),
                       on_renew=lambda: state.update(run.run_id, heartbeat=str(time.time())))
    if not lease.acquire(take_over=holder_gone(settings.node)):
        # A twin of a step that runs right now (a redelivery: the step outlived the visibility timeout).
        # Look again later rather than drop it: if the running copy dies, this one must take over.
        log.warning("%s of run %s is running elsewhere (%s): checking again in %d s", name, run.run_id,
                    (lease.holder() or {}).get("token"), settings.reliability.lock_ttl)
        task.signature_from_request(countdown=settings.reliability.lock_ttl).apply_async()
        raise Ignore()

    def begin() -> None:
        """Count this delivery right before the real work starts (waiting for a lock is not an attempt)."""
        attempt = state.attempt(run.run_id, f"{name}:{task.request.retries}")
        if attempt > settings.reliability.max_attempts:
            raise PgbeatError(f"The {name} step of run {run.run_id} was delivered {attempt} times without "
                              "finishing (its worker keeps dying); giving up", step=name,
                              hint="look for OOM kills or crashes in the worker's log")
        if attempt > 1:
            note_redelivery(settings, run, name, attempt)
        state.update(run.run_id, status="running", step=name)
        state.progress(run.run_id, f"{name} started on {settings.node}" + (f" (attempt {attempt})"
                                                                           if attempt > 1 else ""))

    try:
        if row.opens_run:
            announce_start(ctx, run)
        if row.locks:
            run = _step_with_locks(task, settings, state, ctx, run, row, begin)
        else:
            begin()
            run = execute_step(ctx, run, row)
        result = run.as_json()
        state.step_done(run.run_id, name, result)
        faults.fault_point(STEP_STORED[name])
        result_of_step = run.steps.get(name)
        state.progress(run.run_id, f"{name} done in {result_of_step.duration_s if result_of_step else 0:.2f}s")
        if row.always_runs:
            finish(state, run)
        return result
    except RedisError as exc:
        # The broker itself is unreachable: nothing is known to have failed but our bookkeeping. Give the
        # message back (or leave it unacknowledged, if Redis is still down) so the step runs again.
        log.warning("%s of run %s: Redis unreachable (%s); the step will be delivered again", name, run.run_id, exc)
        raise Reject(f"Redis unreachable: {exc}", requeue=True) from None
    except PgbeatError as exc:
        if ctx.cancel.is_set() and "Redis unreachable" in (ctx.cancel.reason or ""):
            log.warning("%s of run %s stopped while Redis was unreachable; it will be delivered again", name,
                        run.run_id)
            raise Reject(ctx.cancel.reason, requeue=True) from None
        # What Celery records and Flower shows of this failure (its exception text: the message and the
        # reason in one line, e.g. pg_dump's error line) carries no configured secret.
        exc.args = (redact(str(exc), settings),)
        delay = retry_delay(settings, row, exc, task.request.retries)
        if delay is not None:
            state.update(run.run_id, step=name, status="retrying", last_error=str(exc))
            state.progress(run.run_id, f"{name} will be retried in {delay}s: {exc}")
            raise task.retry(exc=exc, countdown=delay, max_retries=settings.reliability.retries) from None
        raise
    finally:
        lease.release()


def finish(state: RunState, run: Run) -> None:
    """Record how the run ended, once its last step (the one that always runs: notify) is done."""
    # The warnings go with the outcome, so `pgbeat backup` on another host prints them with the result.
    state.update(run.run_id, status=run.status, final_path=run.final_path or "",
                 warnings=json.dumps(run.steps.notify.warnings if run.steps.notify else []))
    if run.status == "succeeded":
        state.set_latest(run.target, run.node)


def note_redelivery(settings: Settings, run: Run, step: str, attempt: int) -> None:
    """A step delivered again after its worker was lost: say so once per attempt (a warning, not a failure)."""
    message = f"the {step} step of run {run.run_id} was delivered again (attempt {attempt}) after its worker was lost"
    log.warning(message)
    send_event(settings, Event(kind="warning", target=run.target, tier=run.tier, run_id=run.run_id, node=run.node,
                               at=datetime.now(UTC).isoformat(), step=step, warnings=[message]))


def _wait(task: Task, settings: Settings, state: RunState, run: Run, reason: str, countdown: float,
          holder: str = "?") -> None:
    """Send this dump again after `countdown` seconds, unless the run has waited longer than lock_wait.

    Waiting for a busy target or a free slot is not a failure: the retry count stays as it is, and the
    countdown stays well inside the visibility timeout, so a waiting message is never delivered twice.
    """
    waited_since = float(state.get(run.run_id).get("lock_wait_since") or time.time())
    if time.time() - waited_since > settings.reliability.lock_wait:
        raise LockHeldError(f"The dump of {run.target} waited longer than lock_wait "
                            f"({settings.reliability.lock_wait} s): {reason}", step="dump")
    state.update(run.run_id, status="waiting", step="dump", lock_wait_since=str(waited_since), waiting_for=holder)
    state.progress(run.run_id, f"dump waits: {reason}")
    countdown = min(countdown, settings.reliability.visibility_timeout / 4)
    task.signature_from_request(countdown=countdown).apply_async()
    log.info("dump of run %s waits %.1f s: %s", run.run_id, countdown, reason)
    raise Ignore()


def _step_with_locks(task: Task, settings: Settings, state: RunState, ctx: StepContext, run: Run, row: Step,
                     begin: Callable[[], None]) -> Run:
    """Hold in Redis the locks step `row` declares around it: the target's lock ("target"), a slot of its
    database server and a fleet slot ("dump_slots").

    The target lock keeps two dumps of one database apart; the slots cap dumps per database server
    (`per_host_dumps`) and across the fleet (`max_dumps`), for every worker host at once.
    """
    client = redis_client(settings)
    r = settings.reliability
    cancel = ctx.cancel.cancel
    claims: list = []
    if "target" in row.locks:
        lock = RedisLease(client, target_lock_key(run.target), r.lock_ttl, settings.node, run.run_id,
                          on_lost=lambda reason: cancel(f"lost the target lock: {reason}"))

        def stale(holder: dict[str, str]) -> bool:
            # We hold this run's step lease, so a lock of this same run is an earlier, dead attempt's.
            return holder["run_id"] == run.run_id or holder_gone(settings.node)(holder)

        if not lock.acquire(take_over=stale):
            holder = (lock.holder() or {}).get("run_id", "?")
            _wait(task, settings, state, run, f"{run.target} is being dumped by run {holder}", r.lock_ttl, holder)
        claims.append(lock)
    try:
        target = ctx.target(run)
        caps = [(host_slots_key(f"{target.host or 'local'}:{target.port}"), r.per_host_dumps,
                 f"database server {target.host or 'local'}:{target.port}"), (GLOBAL_SLOTS_KEY, r.max_dumps, "fleet")]
        for key, limit, what in caps if "dump_slots" in row.locks else []:
            if not limit:
                continue
            slot = RedisSemaphore(client, key, limit, r.lock_ttl, settings.node, run.run_id,
                                  on_lost=lambda reason: cancel(f"lost its dump slot: {reason}"))
            if not slot.acquire():
                _wait(task, settings, state, run, f"all {limit} dump slot(s) of the {what} are taken",
                      2 + random.random() * 3)
            claims.append(slot)
        begin()
        return execute_step(ctx, run, row)
    finally:
        for claim in reversed(claims):
            claim.release()

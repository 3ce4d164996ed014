"""The runner contract: how one step of a run is run, retried, locked and cleaned up after, for every runner.

The steps and their rules are declared once in pgbeat.pipeline.steps_table. This module says what any
runner does with a row of it:
- `execute_step` runs the step's function on the record, holding the run's work folder, between the
  step's fault points, and writes its lines to the run's log;
- `retry_delay` decides whether a failure is retried and after how long (transient errors, backoff from
  `settings.reliability`): the in-process runner sleeps that long, the Celery guard sends a retry with it
  as countdown;
- `announce_start` sends the healthchecks start ping, once per run, before the first step waits for its
  locks;
- `fail_run` is the cleanup of a run that failed for good (the Celery errback and the in-process runner
  call it), after which the steps that always run (notify) still run with the failure.

`run_inprocess` is the embedded runner (`pgbeat backup` without a broker); `run_steps` runs a `Plan` (a
subset of the table, e.g. a restore's safety backup) and raises its first failure. The Celery side
(workers/guard.py) adds only what Celery needs: leases, routing, acks, redelivery.

Every step may be killed at any instant and run again with the same record (Celery retries it after a
lost worker, or redelivers it): each recognises the work an earlier attempt did and completes the run.
`execute_step` holds the run's work folder while a step runs (the embedded runner for the whole chain),
so a sweep of leftovers started meanwhile never removes it; fault points at the start and end of every
step (and in the middle of each, in its module) let the kill tests stop a process there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pgbeat import faults, runlog
from pgbeat.backoff import Backoff
from pgbeat.coordination.filelock import hold_file_lock
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import hold_dir, remove_path
from pgbeat.notify import healthchecks
from pgbeat.pipeline.record import Failure, Run, StepContext, new_run
from pgbeat.pipeline.steps_table import FINAL_STEPS, MAIN_STEPS, STEP_TABLE, STEPS, Step, step
from pgbeat.settings import Settings
from pgbeat.steps.upload import undo_partial_publish

log = logging.getLogger(__name__)

STEP_FUNCTIONS: dict[str, Callable[[StepContext, Run], Run]] = {row.name: row.function for row in STEP_TABLE}
STEP_STARTS = {name: faults.declare(f"{name}.start", f"the {name} step is about to run; none of its work is done")
               for name in STEPS}
STEP_ENDS = {name: faults.declare(f"{name}.end", f"the {name} step did its work; its record is not handed on")
             for name in STEPS}
# The key of RunState.once (Celery) under which the start ping is claimed: a dump re-sent while it waits
# for its lock, retried or redelivered pings once.
START_PING = "healthchecks-start"


@dataclass(frozen=True)
class Plan:
    """Which rows of the step table a run takes, and what it tells the world.

    `locks`: take the locks the rows declare (False for a restore's safety backup: the restore holds its
    own lock on the database, and must not wait hours behind a scheduled backup of the target).
    `announce`: the run is one of the target's backups: its healthchecks start ping and its run log.
    """

    steps: tuple[Step, ...] = STEP_TABLE
    locks: bool = True
    announce: bool = True

    @property
    def main_steps(self) -> tuple[Step, ...]:
        return tuple(row for row in self.steps if not row.always_runs)

    @property
    def final_steps(self) -> tuple[Step, ...]:
        return tuple(row for row in self.steps if row.always_runs)


BACKUP = Plan()
assert BACKUP.main_steps == MAIN_STEPS and BACKUP.final_steps == FINAL_STEPS


def execute_step(ctx: StepContext, run: Run, name: str | Step, *, announce: bool = True) -> Run:
    """Run step `name` (a row of the table, or a row of a caller's own plan) on `run` and write its lines
    to the run's log (unless `announce` is false); return the updated record.

    The run's work folder is held meanwhile (the step that opens the run creates it, held from its first
    instant). Raise PgbeatError if another live process holds the folder for longer than a minute.
    """
    row = step(name) if isinstance(name, str) else name
    name = row.name
    with hold_dir(run.work(), create=row.opens_run, wait=60) as held:
        if held is None:
            raise PgbeatError(f"The work folder {run.work()} of run {run.run_id} is in use by another process",
                              step=name, hint="another copy of this step is still running; it is retried later")
        if name in STEP_STARTS:  # a row of the table (a caller's own row has its own points)
            faults.fault_point(STEP_STARTS[name])
        if row.opens_run and announce:
            target = ctx.target(run)
            runlog.write(ctx.settings, run, ctx.now(), *runlog.start_lines(run, target.describe()))
        run = row.function_for(run)(ctx, run)
        lines = runlog.step_lines(run, name) if announce else []
        if lines:
            runlog.write(ctx.settings, run, ctx.now(), *lines)
        if name in STEP_ENDS:
            faults.fault_point(STEP_ENDS[name])
    return run


def backoff_delays(settings: Settings) -> list[float]:
    """Given the settings, return the wait before each retry of a transient failure (doubling, capped)."""
    r = settings.reliability
    return Backoff(r.retry_backoff, r.retry_backoff_max).delays(r.retries)


def retry_delay(settings: Settings, row: Step, exc: BaseException, retries_done: int) -> float | None:
    """Given a failure of step `row` after `retries_done` retries, return the seconds to wait before the
    next attempt, or None if the failure is final (not transient, or the retries are used up)."""
    if not (row.retries_transient and isinstance(exc, PgbeatError) and exc.transient):
        return None
    delays = backoff_delays(settings)
    return delays[retries_done] if retries_done < len(delays) else None


def announce_start(ctx: StepContext, run: Run) -> None:
    """Send the run's healthchecks start ping, the first time a runner asks for this run."""
    if ctx.once is None or ctx.once(START_PING):
        healthchecks.ping(ctx.settings.target(run.target), "start")


def redact(text: str, settings: Settings) -> str:
    """Replace every configured secret that appears in `text` (belt and braces for foreign errors)."""
    secrets = [t.password.get_secret_value() for t in settings.configured() if t.password]
    for url in (settings.broker_url, settings.result_backend):
        if url is not None:
            secrets.append(url.get_secret_value())
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "****")
    return text


def failure_info(exc: BaseException, step: str, settings: Settings) -> Failure:
    """Given a step's failure, return its description for the record and the notification, without secrets."""
    if isinstance(exc, PgbeatError):
        info: dict[str, Any] = {"step": exc.step or step, "message": exc.message, "details": exc.details,
                                "hint": exc.hint, "error": type(exc).__name__}
    else:
        name = type(exc).__name__
        message = str(exc) or name
        if name in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
            message = f"the {step} step exceeded its time limit and was stopped"
        elif isinstance(exc, KeyboardInterrupt):  # say what happened, not the exception's name
            name = message = "Interrupted (Ctrl-C, SIGINT)"
        info = {"step": step, "message": f"{name}: {message}" if name not in message else message,
                "details": [], "hint": None, "error": name}
    info["message"] = redact(info["message"], settings)
    info["details"] = [redact(line, settings) for line in info["details"]]
    return Failure(**info)


def discard_work(settings: Settings, run: Run) -> None:
    """Remove the work folder of a run that failed for good, after taking back what its upload put on the
    shelf without the data file. A backup whole on the shelf is kept; a folder another live process still
    holds (a copy of a step that is running) is left to it."""
    with hold_dir(run.work(), wait=0) as held:
        if held is None:
            log.warning("run %s: its work folder is in use by another process; not removed", run.run_id)
        elif held:
            for line in undo_partial_publish(settings, run.work(), run.run_id):
                log.warning("run %s: %s", run.run_id, line)
            remove_path(run.work())


def fail_run(ctx: StepContext, run: Run, step: str, exc: BaseException, *, shown: bool = False) -> Run:
    """Mark `run` failed at `step`, remove its temporary files, and write the failure to its log.

    `shown`: the caller prints the failure itself (the CLI's in-process backup), so the log has it at
    INFO only; printed twice on a terminal, one failure would read as two.
    """
    run.status = "failed"
    run.failure = failure_info(exc, step, ctx.settings)
    discard_work(ctx.settings, run)
    log.log(logging.INFO if shown else logging.ERROR, "run %s of %s/%s failed at %s: %s", run.run_id, run.target,
            run.tier, step, run.failure.message)
    return run


@contextlib.contextmanager
def hold_step_locks(ctx: StepContext, run: Run, row: Step) -> Iterator[None]:
    """Hold in this process the locks step `row` declares (the target's flock, waiting up to lock_wait).

    Dump slots are not taken in-process: one process runs one dump at a time. Raise LockHeldError (a
    transient error: retried like any other) if the target is still busy after lock_wait.
    """
    if "target" in row.locks:
        with hold_file_lock(ctx.settings.backup_root, run.target, ctx.settings.reliability.lock_wait, ctx.on_wait):
            yield
    else:
        yield


def run_step(ctx: StepContext, run: Run, row: Step, plan: Plan = BACKUP, *,
             sleep: Callable[[float], None] = time.sleep) -> Run:
    """Run one step in this process under the contract: its locks, its retries; return the updated record.

    Raise the step's error once it is final (see `retry_delay`).
    """
    if row.opens_run and plan.announce:
        announce_start(ctx, run)
    retries_done = 0
    while True:
        try:
            with hold_step_locks(ctx, run, row) if plan.locks else contextlib.nullcontext():
                return execute_step(ctx, run, row, announce=plan.announce)
        except PgbeatError as exc:
            delay = retry_delay(ctx.settings, row, exc, retries_done)
            if delay is None:
                raise
            if plan.announce:
                runlog.write(ctx.settings, run, ctx.now(), f"WARNING: {exc.message}; nova tentativa em {delay}s")
            log.warning("run %s: %s failed (%s); retrying in %ss", run.run_id, row.name, exc.message, delay)
            if ctx.on_wait is not None:
                why = f"{exc.message} ({exc.reason})" if exc.reason else exc.message
                ctx.on_wait(f"{row.name} failed: {why}; retry {retries_done + 1} in {delay:.0f}s")
            sleep(delay)
            retries_done += 1


def run_steps(ctx: StepContext, run: Run, plan: Plan, *, sleep: Callable[[float], None] = time.sleep) -> Run:
    """Given a plan without steps that always run, run its steps in order; return the record.

    Raise the first final failure (the caller cleans up: nothing here removes the work folder).
    """
    assert not plan.final_steps, "a plan with steps that always run goes through run_inprocess"
    for row in plan.steps:
        run = run_step(ctx, run, row, plan, sleep=sleep)
    return run


def run_inprocess(settings: Settings, target_name: str, tier: str, *,
                  on_event: Callable[[Run, str, str], None] | None = None,
                  ctx: StepContext | None = None, sleep: Callable[[float], None] = time.sleep,
                  plan: Plan = BACKUP) -> Run:
    """Run the whole chain (`plan`: the step table) in this process (the embedded default); return the
    finished record.

    Every step runs under the contract (`run_step`): its declared locks, transient failures retried with
    backoff exactly as the Celery chain retries them. A failed step stops the chain, the run is cleaned
    up (`fail_run`) and the steps that always run (notify) run with the failure.
    `on_event(run, step, state)` is called with state "started", "done" or "failed".
    """
    target = settings.target(target_name)
    ctx = ctx or StepContext(settings)
    run = new_run(settings, target, tier, now=ctx.now())
    emit = on_event or (lambda *_: None)
    # The work folder is held from its creation to the end: between two steps too, nothing may sweep it.
    with hold_dir(run.work(), create=True):
        return _run_chain(ctx, run, plan, emit, sleep, shown=on_event is not None)


def _run_chain(ctx: StepContext, run: Run, plan: Plan, emit, sleep, *, shown: bool) -> Run:
    for row in plan.main_steps:
        emit(run, row.name, "started")
        try:
            run = run_step(ctx, run, row, plan, sleep=sleep)
        except BaseException as exc:
            run = fail_run(ctx, run, row.name, exc, shown=shown)
            if isinstance(exc, Exception):  # an interruption is said once, by whoever catches it below
                emit(run, row.name, "failed")
            for final in plan.final_steps:
                run_step(ctx, run, final, plan, sleep=sleep)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt / SystemExit: cleaned up and notified, now stop
            return run
        emit(run, row.name, "done")
    for final in plan.final_steps:
        emit(run, final.name, "started")
        run = run_step(ctx, run, final, plan, sleep=sleep)
        emit(run, final.name, "done")
    return run

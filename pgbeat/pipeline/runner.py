"""The chain of steps, dump -> compress -> verify -> upload -> rotate -> notify, and its in-process runner.

Celery tasks (`tasks/`) and the embedded default call the same `execute_step`, so both write the same
log lines and records. A failed step stops the chain; its work folder is removed and `notify` still runs
with the failure (step, reason, the last lines of pg_dump's stderr).

Every step may be killed at any instant and run again with the same record (Celery retries it after a
lost worker, or redelivers it): each recognises the work an earlier attempt did and completes the run.
`execute_step` holds the run's work folder while a step runs (the embedded runner for the whole chain),
so a sweep of leftovers started meanwhile never removes it; fault points at the start and end of every
step (and in the middle of each, in its module) let the kill tests stop a process there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pgbeat import faults, runlog
from pgbeat.backoff import Backoff
from pgbeat.coordination.filelock import hold_file_lock
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import hold_dir, remove_path
from pgbeat.notify import healthchecks
from pgbeat.pipeline.record import Run, StepContext, new_run
from pgbeat.settings import STEPS, Settings
from pgbeat.steps.compress import compress_step
from pgbeat.steps.dump import dump_step
from pgbeat.steps.notify import notify_step
from pgbeat.steps.rotate import rotate_step
from pgbeat.steps.upload import undo_partial_publish, upload_step
from pgbeat.steps.verify import verify_step

log = logging.getLogger(__name__)

STEP_FUNCTIONS: dict[str, Callable[[StepContext, Run], Run]] = {
    "dump": dump_step, "compress": compress_step, "verify": verify_step,
    "upload": upload_step, "rotate": rotate_step, "notify": notify_step,
}
assert tuple(STEP_FUNCTIONS) == STEPS
STEP_STARTS = {name: faults.declare(f"{name}.start", f"the {name} step is about to run; none of its work is done")
               for name in STEPS}
STEP_ENDS = {name: faults.declare(f"{name}.end", f"the {name} step did its work; its record is not handed on")
             for name in STEPS}


def execute_step(ctx: StepContext, run: Run, name: str) -> Run:
    """Run step `name` on `run` and write its lines to the run's log; return the updated record.

    The run's work folder is held meanwhile (the dump creates it, held from its first instant).
    Raise PgbeatError if another live process holds the folder for longer than a minute.
    """
    with hold_dir(run.work(), create=name == "dump", wait=60) as held:
        if held is None:
            raise PgbeatError(f"The work folder {run.work()} of run {run.run_id} is in use by another process",
                              step=name, hint="another copy of this step is still running; it is retried later")
        faults.fault_point(STEP_STARTS[name])
        if name == "dump":
            target = ctx.target(run)
            runlog.write(ctx.settings, run, ctx.now(), *runlog.start_lines(run, target.describe()))
        run = STEP_FUNCTIONS[name](ctx, run)
        lines = runlog.step_lines(run, name)
        if lines:
            runlog.write(ctx.settings, run, ctx.now(), *lines)
        faults.fault_point(STEP_ENDS[name])
    return run


def redact(text: str, settings: Settings) -> str:
    """Replace every configured secret that appears in `text` (belt and braces for foreign errors)."""
    secrets = [t.password.get_secret_value() for t in settings.targets.values() if t.password]
    for url in (settings.broker_url, settings.result_backend):
        if url is not None:
            secrets.append(url.get_secret_value())
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "****")
    return text


def failure_info(exc: BaseException, step: str, settings: Settings) -> dict[str, Any]:
    """Describe a step's failure for the record and the notification, without secrets."""
    if isinstance(exc, PgbeatError):
        info = {"step": exc.step or step, "message": exc.message, "details": exc.details, "hint": exc.hint,
                "error": type(exc).__name__}
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
    return info


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


def fail_run(ctx: StepContext, run: Run, step: str, exc: BaseException) -> Run:
    """Mark `run` failed at `step`, remove its temporary files, and write the failure to its log."""
    run.status = "failed"
    run.failure = failure_info(exc, step, ctx.settings)
    discard_work(ctx.settings, run)
    log.error("run %s of %s/%s failed at %s: %s", run.run_id, run.target, run.tier, step, run.failure["message"])
    return run


def backoff_delays(settings: Settings) -> list[float]:
    r = settings.reliability
    return Backoff(r.retry_backoff, r.retry_backoff_max).delays(r.retries)


def run_inprocess(settings: Settings, target_name: str, tier: str, *,
                  on_event: Callable[[Run, str, str], None] | None = None,
                  ctx: StepContext | None = None, sleep: Callable[[float], None] = time.sleep) -> Run:
    """Run the whole chain in this process (the embedded default); return the finished record.

    Transient failures (server unreachable) are retried with backoff; the target lock is held for the
    dump. `on_event(run, step, state)` is called with state "started", "done" or "failed".
    """
    target = settings.target(target_name)
    ctx = ctx or StepContext(settings)
    run = new_run(settings, target, tier, now=ctx.now())
    healthchecks.ping(target, "start")
    emit = on_event or (lambda *_: None)
    # The work folder is held from its creation to the end: between two steps too, nothing may sweep it.
    with hold_dir(run.work(), create=True):
        return _run_steps(ctx, run, settings, emit, sleep)


def _run_steps(ctx: StepContext, run: Run, settings: Settings, emit, sleep) -> Run:
    target = settings.target(run.target)
    for name in STEPS[:-1]:
        emit(run, name, "started")
        try:
            if name == "dump":
                with hold_file_lock(settings.backup_root, target.name, settings.reliability.lock_wait):
                    run = _with_retries(ctx, run, name, settings, sleep)
            else:
                run = execute_step(ctx, run, name)
        except BaseException as exc:
            run = fail_run(ctx, run, name, exc)
            emit(run, name, "failed")
            execute_step(ctx, run, "notify")
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt / SystemExit: cleaned up and notified, now stop
            return run
        emit(run, name, "done")
    emit(run, "notify", "started")
    run = execute_step(ctx, run, "notify")
    emit(run, "notify", "done")
    return run


def _with_retries(ctx: StepContext, run: Run, name: str, settings: Settings, sleep) -> Run:
    delays = backoff_delays(settings)
    for attempt in range(len(delays) + 1):
        try:
            return execute_step(ctx, run, name)
        except PgbeatError as exc:
            if not exc.transient or attempt == len(delays):
                raise
            runlog.write(settings, run, ctx.now(), f"WARNING: {exc.message}; nova tentativa em {delays[attempt]}s")
            sleep(delays[attempt])
    raise AssertionError("unreachable")

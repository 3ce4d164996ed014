"""`tasks.notify` (the chain's last step) and `tasks.chain_failed` (the errback of every step)."""

import logging

from celery import shared_task

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.pipeline.record import Run, StepContext
from pgbeat.pipeline.runner import execute_step, fail_run
from pgbeat.pipeline.steps_table import FINAL_STEPS
from pgbeat.settings import get_settings
from workers.config import host_queue
from workers.guard import StepTask, run_step

log = logging.getLogger(__name__)


@shared_task(name="tasks.notify", bind=True, base=StepTask)
def notify(self, record: dict) -> dict:
    """Record and send the run's outcome, success or failure (pgbeat.notify)."""
    return run_step(self, "notify", record)


@shared_task(name="tasks.chain_failed")
def chain_failed(request, exc, traceback, record: dict) -> None:
    """Errback: a step failed for good. Clean its files and send the steps that always run (`tasks.notify`)
    with the failure, once.

    Celery calls it inline in the process that saw the failure (on the run's host), with the failing
    task's request; it may be called more than once, so it acts only the first time. It never deletes a
    backup that is whole on the shelf, takes back sidecars published without their data file, and leaves
    a work folder that a live process still holds (pgbeat.pipeline.runner.discard_work); later messages of the
    run, but its notify, are dropped by the step guard.
    """
    settings = get_settings()
    args = getattr(request, "args", None) or [record]
    run = Run.model_validate(args[0])
    state = RunState(redis_client(settings))
    if not state.once(run.run_id, "failed"):
        return
    step = (getattr(request, "task", None) or "tasks.unknown").rsplit(".", 1)[-1]
    ctx = StepContext(settings)
    run = fail_run(ctx, run, step, exc)
    state.update(run.run_id, status="failed", step=step, failure=run.failure.model_dump())
    state.progress(run.run_id, f"{step} failed: {run.failure.message}")
    for final in FINAL_STEPS:
        try:
            chain_failed.app.signature(f"tasks.{final.name}", args=(run.as_json(),),
                                       queue=host_queue(run.node)).apply_async()
        except Exception as send_error:  # the broker is gone: tell what we can from here
            log.error("cannot send tasks.%s (%s); running it inline", final.name, send_error)
            execute_step(ctx, run, final)
            state.update(run.run_id, status="failed")

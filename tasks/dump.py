"""`tasks.dump`: a step of the backup chain."""

from celery import shared_task

from workers.guard import StepTask, run_step


@shared_task(name="tasks.dump", bind=True, base=StepTask)
def dump(self, record: dict) -> dict:
    """Run pg_dump for the run in `record` (pgbeat.steps.dump)."""
    return run_step(self, "dump", record)

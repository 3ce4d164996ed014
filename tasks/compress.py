"""`tasks.compress`: a step of the backup chain."""

from celery import shared_task

from workers.guard import StepTask, run_step


@shared_task(name="tasks.compress", bind=True, base=StepTask)
def compress(self, record: dict) -> dict:
    """Compress the plain dump (pgbeat.steps.compress)."""
    return run_step(self, "compress", record)

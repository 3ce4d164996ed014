"""`tasks.upload`: a step of the backup chain."""

from celery import shared_task

from workers.guard import StepTask, run_step


@shared_task(name="tasks.upload", bind=True, base=StepTask)
def upload(self, record: dict) -> dict:
    """Publish the backup to its destinations (pgbeat.steps.upload)."""
    return run_step(self, "upload", record)

"""`tasks.rotate`: a step of the backup chain."""

from celery import shared_task

from workers.guard import StepTask, run_step


@shared_task(name="tasks.rotate", bind=True, base=StepTask)
def rotate(self, record: dict) -> dict:
    """Apply the tier's retention (pgbeat.steps.rotate)."""
    return run_step(self, "rotate", record)

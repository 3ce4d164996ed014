"""`tasks.verify`: a step of the backup chain."""

from celery import shared_task

from workers.guard import StepTask, run_step


@shared_task(name="tasks.verify", bind=True, base=StepTask)
def verify(self, record: dict) -> dict:
    """Verify the backup and write its manifest (pgbeat.steps.verify)."""
    return run_step(self, "verify", record)

"""`tasks.reconcile`: beat's minute-by-minute check for runs stranded on a dead host (workers.reconcile)."""

from celery import shared_task

from pgbeat.settings import get_settings
from pgbeat.startup import recover_host
from workers.reconcile import reconcile as reconcile_runs


@shared_task(name="tasks.reconcile", bind=True)
def reconcile(self) -> dict:
    """Abandon and re-dispatch the runs of hosts without a live worker."""
    settings = get_settings()
    recover_host(settings, "reconcile")
    return reconcile_runs(self.app, settings)

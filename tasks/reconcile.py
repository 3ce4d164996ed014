"""`tasks.reconcile`: beat's minute-by-minute check for runs stranded on a dead host (workers.reconcile)."""

from celery import shared_task

from pgbeat.settings import get_settings
from workers.reconcile import reconcile as reconcile_runs


@shared_task(name="tasks.reconcile", bind=True)
def reconcile(self) -> dict:
    """Abandon and re-dispatch the runs of hosts without a live worker."""
    return reconcile_runs(self.app, get_settings())

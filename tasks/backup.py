"""`tasks.backup`: what beat sends (args `[target, tier]`) and what `celery call` runs ad hoc."""

from celery import shared_task

from pgbeat.settings import get_settings
from workers.chain import start_backup
from workers.config import task_label


def shown_as(task, args, kwargs, options):
    """`backup erp/daily` in Flower and `celery events` (Celery's shadow name), when sent from a worker."""
    return task_label("backup", *args[:2]) if len(args or ()) >= 2 else None


@shared_task(name="tasks.backup", bind=True, acks_late=True, reject_on_worker_lost=True, shadow_name=shown_as)
def backup(self, target: str, tier: str, scheduled: bool = False, replaces: str | None = None) -> dict:
    """Dispatch the chain of one backup of `target`'s `tier` to this worker's host (see workers.chain)."""
    priority = (self.request.delivery_info or {}).get("priority")
    return start_backup(self.app, get_settings(), self.request.id, target, tier, scheduled, replaces=replaces,
                        priority=priority)

"""`tasks.drill`: a scheduled restore drill, run on the host that holds the target's latest backup."""

from celery import shared_task

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.restore.drill import run_drill
from pgbeat.settings import get_settings
from pgbeat.startup import recover_host
from workers.config import host_queue, task_label


def shown_as(task, args, kwargs, options):
    """`drill erp` in Flower and `celery events` (Celery's shadow name), also when routed to another host."""
    return task_label("drill", args[0]) if args else None


@shared_task(name="tasks.drill", bind=True, shadow_name=shown_as)
def drill(self, target: str, node: str | None = None) -> dict:
    """Drill `target`'s latest backup (pgbeat.restore.drill); beat's message is first routed to the right host."""
    settings = get_settings()
    recover_host(settings, "drill")
    if node is None:
        holder = RunState(redis_client(settings)).latest_node(target) or settings.node
        if holder != settings.node:
            drill.apply_async(args=[target], kwargs={"node": holder}, queue=host_queue(holder))
            return {"routed_to": holder}
    return run_drill(settings, target).as_json()

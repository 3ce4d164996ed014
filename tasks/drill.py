"""`tasks.drill`: a scheduled restore drill, run on the host that holds the target's latest backup; with
`pitr`, the PITR drill of its newest base backup with the WAL archive (pgbeat.physical.drill)."""

from celery import shared_task

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.restore.drill import run_drill
from pgbeat.settings import get_settings
from pgbeat.startup import recover_host
from workers.config import host_queue, task_label


def shown_as(task, args, kwargs, options):
    """`drill erp` (`drill erp/pitr`) in Flower and `celery events` (Celery's shadow name), also when routed to
    another host."""
    return task_label("drill", args[0], "pitr" if (kwargs or {}).get("pitr") else None) if args else None


@shared_task(name="tasks.drill", bind=True, shadow_name=shown_as)
def drill(self, target: str, node: str | None = None, pitr: bool = False) -> dict:
    """Drill `target`'s latest backup (pgbeat.restore.drill), or with `pitr` its newest base backup and the
    WAL archive (pgbeat.physical.drill); beat's message is first routed to the right host."""
    settings = get_settings()
    if target in settings.servers:  # a whole-server target: a drill of each database with backups here
        from pgbeat.discovery import shelf_members

        names = list(shelf_members(settings, target))
        for name in names:
            drill.apply_async(args=[name], shadow=task_label("drill", name))
        return {"drills": names}
    recover_host(settings, "drill")
    if node is None:
        holder = RunState(redis_client(settings)).latest_node(target) or settings.node
        if holder != settings.node:
            drill.apply_async(args=[target], kwargs={"node": holder, "pitr": pitr}, queue=host_queue(holder))
            return {"routed_to": holder}
    if pitr:
        from pgbeat.physical.drill import run_pitr_drill

        server_pgbeat = settings.target(target).drill.server_pgbeat
        return run_pitr_drill(settings, target, pgbeat=str(server_pgbeat) if server_pgbeat else None).as_json()
    return run_drill(settings, target).as_json()

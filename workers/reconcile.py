"""The reconciler: finds runs whose host has no live worker, gives them up, and dispatches them anew.

A chain is pinned to the host that holds its files. When that host dies for good, its queue is never
consumed and Redis's redelivery cannot help (it puts the messages back on the same queue). Beat runs
`tasks.reconcile` every minute: a run still unfinished on a host with no live worker for longer than
`node_timeout` is marked abandoned (so its messages are dropped if the host comes back), and a new run
of the same target and tier is dispatched to a live worker, taking over the old run's slot. A warning
notification names both runs. Each run is re-dispatched at most once. A restore is never re-dispatched
(the operator who asked for it decides; its database is left as pgbeat.restore.journal leaves it): it is
marked failed, so that whoever follows it stops waiting.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

from celery import Celery

from pgbeat.coordination import MANUAL_PRIORITY, redis_client
from pgbeat.coordination.dispatch import task_label
from pgbeat.coordination.runs import NodeRegistry, RunState
from pgbeat.notify import Event, send_event
from pgbeat.settings import Settings

log = logging.getLogger(__name__)


def reconcile(app: Celery, settings: Settings) -> dict:
    client = redis_client(settings)
    state = RunState(client)
    alive = NodeRegistry(client).alive_nodes()
    now = time.time()
    redispatched, given_up = [], []
    for run in state.active_runs():
        node, silent = run.get("node"), now - float(run.get("updated_at", now))
        if (node in alive or silent < settings.reliability.node_timeout
                or settings.resolve(run.get("target") or "") is None):
            continue
        if not state.once(run["run_id"], "abandoned"):
            continue
        reason = f"host {node} has had no live worker for {silent:.0f} s"
        if run.get("kind", "backup") != "backup":
            failure = {"error": "HostLost", "message": f"{run.get('kind')} run {run['run_id']} lost: {reason}",
                       "details": [], "exit_code": 1}
            state.update(run["run_id"], status="failed", reason=reason, failure=failure)
            state.progress(run["run_id"], f"failed: {reason}")
            log.warning(failure["message"])
            given_up.append(run["run_id"])
            continue
        new_id = uuid.uuid4().hex
        state.update(run["run_id"], status="abandoned", reason=reason, replaced_by=new_id)
        state.progress(run["run_id"], f"abandoned: {reason}; re-dispatched as run {new_id}")
        app.send_task("tasks.backup", args=[run["target"], run["tier"]], task_id=new_id, priority=MANUAL_PRIORITY,
                      kwargs={"scheduled": bool(run.get("slot")), "replaces": run["run_id"]},
                      shadow=task_label("backup", run["target"], run["tier"]))
        message = (f"run {run['run_id']} of {run['target']}/{run['tier']} was stuck at {run.get('step') or 'start'} "
                   f"({reason}): re-dispatched as run {new_id}")
        log.warning(message)
        send_event(settings, Event(kind="warning", target=run["target"], tier=run["tier"], run_id=run["run_id"],
                                   node=node or "?", at=datetime.now(UTC).isoformat(), warnings=[message]))
        redispatched.append({"abandoned": run["run_id"], "new": new_id, "node": node})
    return {"redispatched": redispatched, "failed": given_up, "alive_nodes": sorted(alive)}

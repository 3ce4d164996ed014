"""Building and dispatching a backup's chain: every step a task of its own, all pinned to one host.

`tasks.backup` (beat's task, or `celery call`) runs on any worker. It claims the scheduled slot, so a
duplicated or redelivered beat message makes no second backup, then sends the chain
dump -> compress -> verify -> upload -> rotate -> notify to its own host's queue (the files are local),
with `tasks.chain_failed` as the errback of every step.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Celery, chain

from pgbeat.coordination import MANUAL_PRIORITY, SCHEDULED_PRIORITY, redis_client
from pgbeat.coordination.runs import RunState
from pgbeat.notify import Event, send_event
from pgbeat.pipeline.record import Run, new_run
from pgbeat.pipeline.steps_table import STEP_TABLE
from pgbeat.schedule import min_interval, slot_id, slot_of
from pgbeat.settings import Settings
from workers.config import host_queue

log = logging.getLogger(__name__)


def build_chain(app: Celery, settings: Settings, run: Run, priority: int = MANUAL_PRIORITY):
    """Return the chain signature of `run`: one task `tasks.<step>` per row of the step table, in its order,
    every step routed to the run's host with its time limits. The last rows (the steps that always run)
    run as links of the chain on success; after a failure the errback sends them with the failure."""
    queue = host_queue(run.node)
    limits = settings.reliability.limits()
    grace = settings.reliability.hard_limit_grace
    steps = [app.signature(f"tasks.{row.name}", queue=queue, soft_time_limit=limits[row.name],
                           time_limit=limits[row.name] + grace, priority=priority) for row in STEP_TABLE]
    steps[0] = steps[0].clone(args=(run.as_json(),))
    errback = app.signature("tasks.chain_failed", args=(run.as_json(),), queue=queue)
    return chain(*steps).on_error(errback)


def start_backup(app: Celery, settings: Settings, task_id: str, target_name: str, tier: str,
                 scheduled: bool, now: datetime | None = None, replaces: str | None = None,
                 priority: int | None = None) -> dict[str, Any]:
    """Claim the run (and, for beat runs, its slot), then dispatch its chain; return a small summary.

    `replaces` names an abandoned run this one stands in for: it takes over that run's slot. A whole-server
    target's run is one run of each database it discovers now (start_server_backups).
    """
    if target_name in settings.servers:
        return start_server_backups(app, settings, task_id, target_name, tier, scheduled, now, priority)
    target = settings.target(target_name)
    if tier not in target.tiers:
        raise ValueError(f"unknown tier {tier!r}; {target.name}'s tiers are {', '.join(target.tiers)}")
    now = now or datetime.now(UTC)
    state = RunState(redis_client(settings))
    seen = state.get(task_id)
    if seen.get("status") not in (None, "claimed"):
        # This very message was delivered before and its chain is on its way.
        return {"run_id": task_id, "skipped": "already dispatched", "status": seen.get("status")}
    slot = None
    if scheduled:
        schedule = target.tiers[tier].schedule
        slot = slot_id(schedule, now, settings.tz)
        interval = min_interval(schedule, now, settings.tz).total_seconds()
        late = (now - slot_of(schedule, now, settings.tz)).total_seconds()
        if late > settings.reliability.catch_up_window * interval and not replaces:
            # After a long beat outage: the next slot is nearer than this one; say so instead of running.
            reason = f"slot {slot} is {late / 3600:.1f} h old (catch_up_window): skipped, the next run is near"
            state.update(task_id, status="skipped", target=target.name, tier=tier, reason=reason)
            send_event(settings, Event(kind="warning", target=target.name, tier=tier, run_id=task_id,
                                       node=settings.node, at=now.isoformat(), warnings=[reason]))
            return {"run_id": task_id, "skipped": reason}
        owner = state.claim_slot(target.name, tier, slot, task_id, int(interval * 2))
        if owner is not None and owner == replaces:
            state.take_slot(target.name, tier, slot, task_id, int(interval * 2))
        elif owner is not None and owner != task_id:
            log.warning("slot %s of %s/%s already served by run %s: skipping", slot, target.name, tier, owner)
            state.update(task_id, status="skipped", target=target.name, tier=tier, duplicate_of=owner)
            return {"run_id": task_id, "skipped": f"slot {slot} already served by run {owner}"}
    run = new_run(settings, target, tier, run_id=task_id, slot=slot, now=now)
    if priority is None:
        priority = SCHEDULED_PRIORITY if scheduled else MANUAL_PRIORITY
    state.update(task_id, status="claimed", target=target.name, tier=tier, node=run.node, name=run.name,
                 slot=slot or "", priority=str(priority), replaces=replaces or "")
    # The healthchecks start ping is the runner contract's (pgbeat.pipeline.runner.announce_start): the
    # dump's guard sends it, once, when the first step arrives on the run's host.
    build_chain(app, settings, run, priority).apply_async()
    state.update(task_id, status="queued")
    log.info("dispatched %s/%s as run %s on %s", target.name, tier, task_id, run.node)
    return {"run_id": task_id, "node": run.node, "name": run.name, "slot": slot}


def start_server_backups(app: Celery, settings: Settings, task_id: str, server: str, tier: str, scheduled: bool,
                         now: datetime | None = None, priority: int | None = None) -> dict[str, Any]:
    """Discover the databases of whole-server target `server` and start one backup of `tier` for each,
    exactly as for a listed target (its own run, slot, chain, locks and caps). Each run's id is derived from
    this task's, so a redelivered message starts no second run of a database. Return a small summary."""
    from pgbeat.discovery import announce, expand

    if tier not in settings.servers[server].tiers:
        raise ValueError(f"unknown tier {tier!r}; {server}'s tiers are {', '.join(settings.servers[server].tiers)}")
    if not settings.servers[server].runs_tier(tier):
        return {"run_id": task_id, "skipped": f"tier {tier} is disabled"}
    names, [found] = expand(settings, [server], now)
    announce(settings, found, tier, task_id)
    if found.error is not None:
        RunState(redis_client(settings)).update(task_id, status="failed", target=server, tier=tier,
                                                reason=found.error)
        return {"run_id": task_id, "error": found.error}
    runs = {name: start_backup(app, settings, database_run_id(task_id, name), name, tier, scheduled, now,
                               priority=priority) for name in names}
    # This task's own record says what it started (a state no reconciler or `pgbeat status` counts as a run).
    state = RunState(redis_client(settings))
    state.update(task_id, status="dispatched", target=server, tier=tier, databases=sorted(runs))
    state.client.hincrby(state.key(task_id), "deliveries", 1)
    log.info("whole-server target %s/%s: %d database(s) discovered", server, tier, len(runs))
    return {"run_id": task_id, "databases": runs, "warnings": found.warnings()}


def database_run_id(task_id: str, name: str) -> str:
    """The run id of database target `name`'s backup started by whole-server task `task_id`: derived from
    both, so that a message delivered again starts no second run."""
    import uuid

    return uuid.uuid5(uuid.UUID(int=0), f"{task_id}/{name}").hex

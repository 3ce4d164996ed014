"""The beat schedule, built from the settings: one entry per (target, tier), one restore drill per target, and
one PITR drill per target with the base tier (`drill erp pitr`).

Each entry sends `tasks.backup` with JSON args `[target, tier]` (plus `scheduled=True`, which makes the
worker claim the slot, so a duplicated or redelivered message makes no second backup) and `expires`
just short of the next run, so a backlog never stacks duplicates; its shadow name (`backup erp/daily`) is
what Flower and `celery events` show.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery.schedules import crontab

from pgbeat.coordination import SCHEDULED_PRIORITY
from pgbeat.coordination.dispatch import task_label
from pgbeat.schedule import expiry_seconds
from pgbeat.settings import Settings


def cron_schedule(expr: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = expr.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def build_beat_schedule(settings: Settings, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    now = now or datetime.now(UTC)
    schedule = {}
    # A whole-server target has one entry per tier: its task discovers the databases then (workers.chain).
    for target in settings.configured():
        for tier in target.enabled_tiers():
            expr = target.tiers[tier].schedule
            schedule[f"backup {target.name} {tier}"] = {
                "task": "tasks.backup",
                "schedule": cron_schedule(expr),
                "args": (target.name, tier),
                "kwargs": {"scheduled": True},
                "options": {"expires": expiry_seconds(expr, now, settings.tz), "priority": SCHEDULED_PRIORITY,
                            "shadow": task_label("backup", target.name, tier)},
            }
        if target.drill.enabled:  # a whole-server target's drills each of its databases (tasks.drill)
            schedule[f"drill {target.name}"] = {
                "task": "tasks.drill",
                "schedule": cron_schedule(target.drill.schedule),
                "args": (target.name,),
                "options": {"expires": expiry_seconds(target.drill.schedule, now, settings.tz),
                            "shadow": task_label("drill", target.name)},
            }
        if target.drill.enabled and target.runs_tier("base"):
            schedule[f"drill {target.name} pitr"] = {
                "task": "tasks.drill",
                "schedule": cron_schedule(target.drill.pitr_schedule),
                "args": (target.name,),
                "kwargs": {"pitr": True},
                "options": {"expires": expiry_seconds(target.drill.pitr_schedule, now, settings.tz),
                            "shadow": task_label("drill", target.name, "pitr")},
            }
    if settings.targets or settings.servers:
        # Every minute: runs stranded on a host without a live worker are re-dispatched (workers.reconcile).
        schedule["reconcile runs"] = {"task": "tasks.reconcile", "schedule": crontab(), "options": {"expires": 50}}
    return schedule

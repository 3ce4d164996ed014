"""The Celery app: `celery -A workers.app worker`, `celery -A workers.app beat`, `celery -A workers.app call`.

Settings come from the environment, `.env` and `PGBEAT_CONFIG` (pgbeat.settings). An invalid config is
printed with every error and the process exits with code 2 before anything starts.
"""

from __future__ import annotations

import sys

from celery import Celery
from celery.app.amqp import AMQP

from pgbeat.errors import EXIT_CONFIG, ConfigError
from pgbeat.settings import Settings, get_settings
from workers.config import celery_config

TASK_MODULES = ["tasks.backup", "tasks.dump", "tasks.compress", "tasks.verify", "tasks.upload", "tasks.rotate",
                "tasks.notify", "tasks.restore", "tasks.drill", "tasks.reconcile"]


def load_or_exit() -> Settings:
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    if settings.embedded:
        print("pgbeat: no broker configured (set CELERY_BROKER_URL or broker_url in PGBEAT_CONFIG); the Celery "
              "service needs Redis. Without one, `pgbeat backup TIER` runs the chain in-process.", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return settings


class ShadowedAMQP(AMQP):
    """Celery's messages, but a task's `task-sent` event carries its shadow name (`dump erp/daily`) like its
    other events. Celery puts the plain task name there; Flower merges a later `task-sent` (a retry or a
    re-send while the dump waits for a lock) into the row, which then showed `tasks.dump` until the task was
    received again."""

    def as_task_v2(self, *args, **kwargs):
        message = super().as_task_v2(*args, **kwargs)
        if message.sent_event is not None and message.headers.get("shadow"):
            message.sent_event["name"] = message.headers["shadow"]
        return message


settings = load_or_exit()
app = Celery("pgbeat", include=TASK_MODULES, amqp=ShadowedAMQP)
app.conf.update(celery_config(settings))

import workers.signals  # noqa: E402,F401  (registers the signal handlers)

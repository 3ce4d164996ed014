"""Celery settings derived from pgbeat's Settings; the comment beside each value says why it is so."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from beat_schedule import build_beat_schedule
from pgbeat.coordination.dispatch import DEFAULT_QUEUE, client_config, host_queue, task_label
from pgbeat.settings import Settings

__all__ = ["DEFAULT_QUEUE", "celery_config", "host_queue", "split_credentials", "task_label"]


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """Given a Redis URL, return it without user name and password, and those as redis-py client options.

    Celery censors what it shows of a setting (`celery inspect conf`, Flower's worker view) by the
    setting's name: `broker_url` and `*backend*` URLs are sanitised, any key matching PASS, KEY, SECRET...
    is masked, but a URL under another name, such as RedBeat's `redbeat_redis_url`, is shown whole. So
    that URL carries no credentials; they go to `redbeat_redis_options`, whose `password` Celery masks.
    """
    parts = urlsplit(url)
    options = {}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), options


def celery_config(settings: Settings) -> dict[str, Any]:
    """Given the settings, return the workers' (and beat's) Celery settings: the producers' own
    (pgbeat.coordination.dispatch.client_config: broker, JSON, transport options, default queue) and
    what only the service needs."""
    r = settings.reliability
    client = client_config(settings)
    broker = client["broker_url"]
    redbeat_url, credentials = split_credentials(broker) if broker else (None, {})
    return {
        **client,
        # Each pool process reserves only the task it runs, and nothing waits in a prefetch buffer
        # behind a long dump where the visibility timeout would redeliver it.
        "worker_prefetch_multiplier": 1, "worker_disable_prefetch": True,
        # Steps acknowledge when done; a killed pool process gets its step retried (bounded by max_retries).
        "task_acks_late": True, "task_reject_on_worker_lost": True, "task_retry_on_worker_lost": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_track_started": True, "result_expires": r.result_expires, "result_extended": True,
        "worker_send_task_events": True, "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_soft_shutdown_timeout": 60.0, "worker_enable_soft_shutdown_on_idle": True,
        "beat_schedule": build_beat_schedule(settings),
        # RedBeat: the schedule and its last runs live in Redis, and a leader lock lets a standby beat
        # take over (after beat_lock_timeout) without two beats ever sending the same slot. The scheduler
        # (workers.scheduler) holds the lock and re-creates what a Redis restart lost, on every tick.
        "beat_scheduler": "workers.scheduler:PgbeatScheduler",
        "redbeat_redis_url": redbeat_url,
        # The client options of beat's own Redis connection: the credentials (masked by Celery), and
        # timeouts, so that a Redis that stops answering is an error beat retries, not a read that hangs.
        "redbeat_redis_options": {**credentials, "socket_timeout": 30, "socket_connect_timeout": 10,
                                  "health_check_interval": 30},
        "redbeat_key_prefix": "pgbeat:redbeat:",
        "redbeat_lock_timeout": r.beat_lock_timeout,
        # Beat renews the lock on every tick: ticks at least five times per lock period (RedBeat's ratio),
        # or a lock shorter than the interval would expire between two ticks.
        "beat_max_loop_interval": min(30.0, r.beat_lock_timeout / 5),
    }

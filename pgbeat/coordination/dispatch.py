"""Sending a task to the workers from outside them (the CLI), without importing the Celery side.

The queues and the broker settings that every client of the broker must share are defined here, once:
`workers/config.py` builds the workers' configuration on top of `client_config`. Celery is imported
inside the functions that send, so the core (and `pgbeat --help`) never loads it at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgbeat.errors import UnreachableError

if TYPE_CHECKING:
    from celery import Celery

    from pgbeat.settings import Settings

DEFAULT_QUEUE = "pgbeat"


def broker_address(settings: Settings) -> str:
    """Where the broker is (host:port, or a socket's path), without the credentials its URL may carry."""
    from urllib.parse import urlsplit

    assert settings.broker_url is not None
    parts = urlsplit(settings.broker_url.get_secret_value())
    return parts.netloc.rpartition("@")[2] or parts.path


def broker_problem(settings: Settings) -> str | None:
    """Ping the broker once, without redis-py's retries, so that a broker that is down is said at once;
    return the problem, or None."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    assert settings.broker_url is not None
    try:
        with redis.Redis.from_url(settings.broker_url.get_secret_value(), socket_connect_timeout=5,
                                  socket_timeout=5, retry=Retry(NoBackoff(), 0)) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"cannot reach Redis at {broker_address(settings)} ({type(exc).__name__})"
    return None


def require_broker(settings: Settings, way_out: str) -> None:
    """Raise UnreachableError (exit 5) unless the broker answers, before anything is sent to it. Its one
    line says that nothing was sent and `way_out`: what the user can do without the broker."""
    problem = broker_problem(settings)
    if problem is not None:
        raise UnreachableError(f"The broker: {problem}; nothing was sent. {way_out}")


def host_queue(node: str) -> str:
    """The queue of one host: every step of a chain goes there, because the files are local to it."""
    return f"pgbeat.host.{node}"


def task_label(what: str, target: str, tier: str | None = None) -> str:
    """The name a task of `target` shows in Flower's task list, `celery events` and `celery inspect` (its
    Celery shadow name) instead of `tasks.<step>` beside a UUID: what it does, the target and the tier, e.g.
    `dump erp/daily`, `backup erp/daily`, `restore erp`, `drill erp`. Flower's search box matches it, so a
    target's name finds every step of its runs."""
    return f"{what} {target}/{tier}" if tier else f"{what} {target}"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Given the settings, return the Redis transport options every consumer and producer must share.

    Priorities on Redis: one list per step, lower is served first (manual 0, scheduled 6). Unacknowledged
    messages of a dead worker come back after visibility_timeout, looked for every restore_interval
    seconds (kombu's default throttle would make that every 100 s). Every consumer (workers, beat,
    Flower) and the CLI must use the same values; see Reliability.
    """
    r = settings.reliability
    return {"visibility_timeout": r.visibility_timeout, "priority_steps": list(range(10)), "sep": ":",
            "queue_order_strategy": "priority", "unacked_restore_interval": r.restore_interval,
            "unacked_restore_throttle": 1}


def client_config(settings: Settings) -> dict[str, Any]:
    """Given the settings, return the Celery settings a producer needs: broker, result backend, JSON only,
    the shared transport options and the default queue."""
    broker = settings.broker_url.get_secret_value() if settings.broker_url else None
    backend = settings.result_backend.get_secret_value() if settings.result_backend else broker
    transport = transport_options(settings)
    return {
        "broker_url": broker,
        "result_backend": backend,
        # JSON only: pickle from a shared broker is remote code execution.
        "task_serializer": "json", "result_serializer": "json",
        "accept_content": ["json"], "result_accept_content": ["json"],
        "timezone": settings.timezone, "enable_utc": True,
        "broker_transport_options": transport, "result_backend_transport_options": transport,
        "task_default_queue": DEFAULT_QUEUE,
    }


_apps: dict[str, Celery] = {}


def client_app(settings: Settings) -> Celery:
    """Given the settings, return a Celery app that sends and inspects tasks (it registers none), one
    per broker per process."""
    from celery import Celery

    config = client_config(settings)
    key = f"{config['broker_url']}|{config['result_backend']}"
    if key not in _apps:
        app = Celery("pgbeat-client", set_as_current=False)
        app.conf.update(config)
        _apps[key] = app
    return _apps[key]


def send_task(settings: Settings, name: str, args: list, task_id: str, *, shadow: str, **options: Any) -> None:
    """Send task `name` with `args` under `task_id`, shown as `shadow` (task_label) in Flower and `celery
    events` (options: queue, priority, expires, ignore_result...)."""
    client_app(settings).send_task(name, args=args, task_id=task_id, shadow=shadow, **options)


def task_failure(settings: Settings, task_id: str) -> BaseException | None:
    """Return the exception Celery recorded for `task_id` when it failed (its pool process died, say),
    or None while it has not failed."""
    result = client_app(settings).AsyncResult(task_id)
    if result.state != "FAILURE":
        return None
    reason = result.result
    return reason if isinstance(reason, BaseException) else RuntimeError(repr(reason))


def terminate_task(settings: Settings, task_id: str, signal: str = "SIGTERM") -> None:
    """Ask the worker running `task_id` to send its process `signal` (a task not yet started is dropped)."""
    client_app(settings).control.revoke(task_id, terminate=True, signal=signal)

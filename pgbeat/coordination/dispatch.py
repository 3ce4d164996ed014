"""Sending a task to the workers from outside them (the CLI), without importing the Celery side.

The queues and the broker settings that every client of the broker must share are defined here, once:
`workers/config.py` builds the workers' configuration on top of `client_config`. Celery is imported
inside the functions that send, so the core (and `pgbeat --help`) never loads it at import time.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
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


def queue_consumers(settings: Settings, queue: str) -> list[str]:
    """The live workers that consume `queue`: from the workers' heartbeats in Redis (one read), else from
    the workers themselves, asked with a one-second broadcast (a worker that started a moment ago and has
    not beaten yet, a busy one whose heartbeat is late)."""
    from pgbeat.coordination import redis_client
    from pgbeat.coordination.runs import NodeRegistry

    found = NodeRegistry(redis_client(settings)).consumers_of(queue)
    if found:
        return found
    replies = client_app(settings).control.inspect(timeout=1.0).active_queues() or {}
    return [worker for worker, queues in replies.items() if any(q.get("name") == queue for q in queues or [])]


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


# --- what waits in the queues ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuedMessage:
    """A task message waiting in one of the queues' Redis lists: sent, and taken by no worker yet."""

    queue: str
    task: str
    task_id: str
    run_id: str | None  # the run it belongs to: the task's own id, or the id in a chain step's record
    target: str | None
    tier: str | None
    priority: int


# Where the tasks that are not chain steps name their target and tier among their args (a chain step's
# first arg is its run's record, which names both).
TASK_ARGS = {"tasks.backup": {"target": 0, "tier": 1}, "tasks.drill": {"target": 0}, "tasks.restore": {"target": 1}}


def queue_of_list(key: str, settings: Settings) -> tuple[str, int] | None:
    """Given a Redis key, return (the queue, the priority) whose list it is, or None for any other key.
    With the shared transport options a queue is one list per priority: `pgbeat` (priority 0), `pgbeat:6`..."""
    sep = re.escape(transport_options(settings)["sep"])
    found = re.fullmatch(rf"({re.escape(DEFAULT_QUEUE)}|{re.escape(host_queue(''))}[^:]+)(?:{sep}(\d))?", key)
    return None if found is None else (found.group(1), int(found.group(2) or 0))


def read_message(raw: bytes, queue: str, priority: int) -> QueuedMessage:
    """Given a message as kombu keeps it in a Redis list (JSON: Celery's headers, a base64 body), return
    what it is; a message that cannot be read is still counted, as task '?'."""
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
        body = message.get("body", "")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0] if headers.get("task") else []
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return QueuedMessage(queue, "?", "?", None, None, None, priority)
    task, task_id = str(headers.get("task")), str(headers.get("id"))
    if args and isinstance(args[0], dict):  # a chain step: its run's record
        record = args[0]
        return QueuedMessage(queue, task, task_id, record.get("run_id"), record.get("target"), record.get("tier"),
                             priority)
    where = TASK_ARGS.get(task, {})
    named = {what: str(args[i]) if i < len(args) else None for what, i in where.items()}
    return QueuedMessage(queue, task, task_id, task_id, named.get("target"), named.get("tier"), priority)


def queued_messages(settings: Settings, limit: int = 1000) -> tuple[list[QueuedMessage], dict[str, int]]:
    """Return the task messages waiting in the queues' lists in Redis, oldest first (at most `limit` per
    list), and how many wait per queue (all of them)."""
    from pgbeat.coordination import redis_client

    client = redis_client(settings)
    messages: list[QueuedMessage] = []
    counts: dict[str, int] = {}
    for key in sorted(k.decode() for k in client.scan_iter(match=f"{DEFAULT_QUEUE}*", count=500, _type="list")):
        where = queue_of_list(key, settings)
        if where is None:
            continue
        queue, priority = where
        counts[queue] = counts.get(queue, 0) + client.llen(key)
        # kombu pushes on the left and takes from the right: the oldest message is the last.
        messages += [read_message(raw, queue, priority) for raw in reversed(client.lrange(key, -limit, -1))]
    return messages, counts

"""Coordination between runs: Redis leases, slots and run state; file locks without a broker.

The Redis client lives here (not in `workers/`), so the CLI and the core reach the broker's Redis
without importing the Celery side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

    from pgbeat.settings import Settings

PREFIX = "pgbeat"
RUN_TTL = 14 * 86400
# Redis priorities: lower is served sooner. A manual backup or restore (0) is not stuck behind a night
# of scheduled dumps (6); every step of a chain keeps its run's priority.
MANUAL_PRIORITY, SCHEDULED_PRIORITY = 0, 6

_clients: dict[str, redis.Redis] = {}


def redis_client(settings: Settings) -> redis.Redis:
    """The coordination client (locks, run state): the broker's Redis, one pool per process."""
    import redis

    assert settings.broker_url is not None
    url = settings.broker_url.get_secret_value()
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                             health_check_interval=30)
    return _clients[url]

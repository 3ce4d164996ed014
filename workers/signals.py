"""Signal hooks of the worker."""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
from redis.exceptions import RedisError

from pgbeat.coordination import redis_client
from pgbeat.coordination.runs import NodeRegistry
from pgbeat.settings import get_settings
from pgbeat.startup import recover_host
from workers.config import host_queue

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 10.0
_stop_heartbeat = threading.Event()


@celeryd_after_setup.connect
def consume_host_queue(sender, instance, **kwargs):
    """Consume this host's queue too, whatever `-Q` says: chains pinned here must find a worker."""
    instance.app.amqp.queues.select_add(host_queue(get_settings().node))


# The client library of each kind of destination, imported lazily by pgbeat.storage.
STORAGE_LIBRARIES = {"s3": "boto3", "gcs": "google.cloud.storage", "ssh": "paramiko"}


@celeryd_after_setup.connect
def preload_storage_libraries(sender, instance, **kwargs):
    """Import the client libraries of the configured destinations before the pool forks: every pool process,
    also one started anew after another died, then has them instead of importing them for its first copy."""
    kinds = {spec.kind for target in get_settings().configured() for spec in target.destinations}
    for kind in sorted(kinds):
        try:
            importlib.import_module(STORAGE_LIBRARIES[kind])
        except ImportError as exc:  # the copy itself reports it, naming the destination
            log.warning("cannot preload %s for %s destinations: %s", STORAGE_LIBRARIES[kind], kind, exc)


@worker_ready.connect
def announce_and_clean(sender, **kwargs):
    """Settle what killed runs left on this host (pgbeat.startup: among others, work folders that no live
    process holds and no active run needs), then start this worker's heartbeat."""
    settings = get_settings()
    recover_host(settings, "worker")
    threading.Thread(target=_heartbeat, args=(settings.node, sender), name="pgbeat-heartbeat", daemon=True).start()
    start_receivers(settings)


_stop_receivers = threading.Event()
_receiver_threads: list[threading.Thread] = []


def start_receivers(settings) -> None:
    """Run the WAL receivers of the targets with wal.receiver in this worker's main process (one thread
    each; the fleet-wide lease lets one worker host stream each target, the others stand by)."""
    from pgbeat.wal.receiver import receiver_targets, run_receivers

    targets = receiver_targets(settings)
    if targets:
        _receiver_threads.extend(run_receivers(settings, targets, _stop_receivers))


def consumed_queues(consumer) -> list[str] | None:
    """The queues the worker's consumer reads now (`-Q`, the host queue, any added by `add_consumer`), or
    None while it has no task consumer (reconnecting)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return None if task_consumer is None else [queue.name for queue in task_consumer.queues]


def _heartbeat(node: str, consumer) -> None:
    """Tell the reconciler this host has a live worker (a host without one has its runs re-dispatched),
    and the CLI which queues it consumes (a backup sent where no live worker reads is said at once)."""
    registry = NodeRegistry(redis_client(get_settings()))
    while not _stop_heartbeat.is_set():
        try:
            registry.beat(node, consumer.hostname, ttl=3 * HEARTBEAT_EVERY, queues=consumed_queues(consumer))
        except RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)
        _stop_heartbeat.wait(HEARTBEAT_EVERY)


@worker_shutdown.connect
def leave(sender, **kwargs):
    """Stop the heartbeat and the receivers (pg_receivewal stopped, their leases released for another
    host to take at once), and leave the registry."""
    _stop_heartbeat.set()
    _stop_receivers.set()
    for thread in _receiver_threads:
        thread.join(timeout=30)
    with contextlib.suppress(RedisError, AttributeError):
        NodeRegistry(redis_client(get_settings())).leave(get_settings().node, sender.hostname)

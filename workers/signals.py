"""Signal hooks of the worker."""

from __future__ import annotations

import logging
import time

from celery.signals import celeryd_after_setup, worker_ready

from pgbeat.fsutil import remove_path
from pgbeat.run import WORK_DIR
from pgbeat.settings import get_settings
from workers.config import host_queue

log = logging.getLogger(__name__)


@celeryd_after_setup.connect
def consume_host_queue(sender, instance, **kwargs):
    """Consume this host's queue too, whatever `-Q` says: chains pinned here must find a worker."""
    instance.app.amqp.queues.select_add(host_queue(get_settings().node))


@worker_ready.connect
def remove_abandoned_work(sender, **kwargs):
    """Remove work folders of runs that cannot still be running (older than the visibility timeout)."""
    settings = get_settings()
    work = settings.backup_root / WORK_DIR
    horizon = time.time() - settings.reliability.visibility_timeout
    if not work.is_dir():
        return
    for folder in work.iterdir():
        try:
            if folder.stat().st_mtime < horizon:
                remove_path(folder)
                log.warning("removed abandoned work folder %s", folder)
        except FileNotFoundError:
            pass

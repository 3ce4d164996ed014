"""What every pgbeat process does first on a host: finish or undo what a killed run left behind.

A run killed at the wrong moment (SIGKILL, a dropped SSH session, a dead host, a power cut) can leave
things that only a later run can settle: an interrupted restore, a work folder, a partial file. The
CLI calls `recover_host` when it loads the settings, workers when they start, drills and the reconciler
before they work, so the next pgbeat run of any kind on that host repairs it.

Each recovery in `RECOVERIES` is a function of the settings that returns one line per thing it did;
it must be cheap when there is nothing to do (a directory listing, no imports of heavy modules) and may
raise: a failing recovery is logged and the others still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pgbeat.pipeline.record import sweep_work_folders
from pgbeat.postgres.standby import resume_abandoned_pauses
from pgbeat.restore.journal import recover_restores
from pgbeat.settings import Settings

log = logging.getLogger(__name__)

Recovery = Callable[[Settings], list[str]]

# Filled in by the modules that leave state behind (restore journals, work folders, ...), in order.
RECOVERIES: list[Recovery] = [
    recover_restores,  # interrupted restores and drills (pgbeat.restore.journal), before the folders they name
    sweep_work_folders,  # work folders no live process holds (pgbeat.pipeline.record)
    resume_abandoned_pauses,  # WAL replay a killed dump paused on a standby (pgbeat.postgres.standby)
]


def recover_host(settings: Settings, context: str) -> list[str]:
    """Run every recovery on this host's leftovers; return what was done, one line per thing.

    `context` says who asks ("cli", "worker", "drill", "reconcile", "inprocess"), for the log.
    """
    done: list[str] = []
    for recovery in RECOVERIES:
        try:
            done += recovery(settings)
        except Exception as exc:  # one broken recovery must not stop the others, nor the run
            log.warning("recovery %s failed (%s): %s", getattr(recovery, "__name__", recovery), context, exc)
    for line in done:
        log.warning("%s: %s", context, line)
    return done

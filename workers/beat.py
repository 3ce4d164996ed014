"""The beat scheduler: Celery's PersistentScheduler, keeping its state file in BACKUP_ROOT/.state."""

from __future__ import annotations

from pathlib import Path

from celery.beat import PersistentScheduler

from pgbeat.fsutil import private_dir


class Scheduler(PersistentScheduler):
    """Creates the state folder before opening the schedule file (no beat signal fires that early)."""

    def __init__(self, *args, **kwargs) -> None:
        filename = kwargs.get("schedule_filename") or args[0].conf.beat_schedule_filename
        private_dir(Path(filename).parent)
        super().__init__(*args, **kwargs)

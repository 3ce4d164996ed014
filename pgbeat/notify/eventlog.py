"""The event log channel: one JSON line per outcome in `BACKUP_ROOT/logs/events.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pgbeat.fsutil import FILE_MODE, private_dir
from pgbeat.notify.base import Event


class EventLogNotifier:
    name = "eventlog"

    def __init__(self, backup_root: Path) -> None:
        self.path = Path(backup_root) / "logs" / "events.jsonl"

    def send(self, event: Event) -> None:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            os.write(fd, (json.dumps(event.as_json(), ensure_ascii=False) + "\n").encode())
        finally:
            os.close(fd)

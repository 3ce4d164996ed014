"""Telling a person watching a dump how far it is, and that pg_dump is blocked on a lock, and by whom.

`DumpProgress` reads what the dump step already counts (the bytes and rows its scanner has seen, or the
size written so far for an archive) once a second, on a thread of its own: nothing is added to the
stream's path.

pg_dump takes an ACCESS SHARE lock on every table it dumps; a session holding a stronger lock (an
ALTER TABLE, a TRUNCATE, a long VACUUM FULL) makes it wait, silently, for as long as that session lives.
While a run is watched (`StepContext.on_wait`), `LockWatch` asks the server every few seconds, on a
connection of its own, whether a pgbeat backend of that database waits for a lock, and says once per
blocker which sessions block it, what they run and since when.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pgbeat.settings import Target

POLL_S = 2.0
BLOCKED = """
SELECT DISTINCT b.pid, coalesce(b.usename, '?'), coalesce(b.application_name, ''), left(coalesce(b.query, ''), 80)
FROM pg_stat_activity w CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocker(pid)
JOIN pg_stat_activity b ON b.pid = blocker.pid
WHERE w.datname = current_database() AND w.application_name = 'pgbeat' AND w.pid <> pg_backend_pid()
  AND w.wait_event_type = 'Lock'
ORDER BY b.pid
"""


class Watcher:
    """A daemon thread running `watch(stopped)` from `start()` until `stop()`; what it raises ends it
    quietly, since a watcher must never fail the dump it watches."""

    name = "watcher"

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self.watch(self._stopped)
        except Exception:
            return

    def watch(self, stopped: threading.Event) -> None:
        raise NotImplementedError


class LockWatch(Watcher):
    """Says, through `on_wait`, which sessions block `target`'s dump, once per blocking session."""

    name = "lock-watch"

    def __init__(self, target: Target, on_wait: Callable[[str], None], poll_s: float = POLL_S) -> None:
        super().__init__()
        self.target, self.on_wait, self.poll_s = target, on_wait, poll_s

    def watch(self, stopped: threading.Event) -> None:
        from pgbeat.postgres.client import connect

        said: set[int] = set()
        with connect(self.target) as conn:
            conn.autocommit = True
            while not stopped.wait(self.poll_s):
                new = [b for b in conn.execute(BLOCKED).fetchall() if b[0] not in said]
                if new:
                    said.update(b[0] for b in new)
                    who = "; ".join(f"pid {pid} ({user}{', ' + app if app else ''}: {query!r})"
                                    for pid, user, app, query in new)
                    self.on_wait(f"dump: pg_dump waits for a lock held by {who}")


PROGRESS_S = 1.0


class DumpProgress(Watcher):
    """Calls `on_progress(measure())` every `every_s` seconds."""

    name = "dump-progress"

    def __init__(self, measure: Callable[[], str], on_progress: Callable[[str], None],
                 every_s: float = PROGRESS_S) -> None:
        super().__init__()
        self.measure, self.on_progress, self.every_s = measure, on_progress, every_s

    def watch(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.every_s):
            self.on_progress(self.measure())

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


class LockWatch:
    """A thread saying, through `on_wait`, which sessions block `target`'s dump; `stop()` ends it."""

    def __init__(self, target: Target, on_wait: Callable[[str], None], poll_s: float = POLL_S) -> None:
        self.target, self.on_wait, self.poll_s = target, on_wait, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lock-watch", daemon=True)

    def start(self) -> LockWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        from pgbeat.postgres.client import connect

        said: set[int] = set()
        try:
            with connect(self.target) as conn:
                conn.autocommit = True
                while not self._stop.wait(self.poll_s):
                    blockers = conn.execute(BLOCKED).fetchall()
                    new = [b for b in blockers if b[0] not in said]
                    if new:
                        said.update(b[0] for b in new)
                        who = "; ".join(f"pid {pid} ({user}{', ' + app if app else ''}: {query!r})"
                                        for pid, user, app, query in new)
                        self.on_wait(f"dump: pg_dump waits for a lock held by {who}")
        except Exception:  # a watch must never fail the dump it watches
            return


PROGRESS_S = 1.0


class DumpProgress:
    """A thread calling `on_progress(text)` every PROGRESS_S with `measure()`'s text; `stop()` ends it."""

    def __init__(self, measure: Callable[[], str], on_progress: Callable[[str], None],
                 every_s: float = PROGRESS_S) -> None:
        self.measure, self.on_progress, self.every_s = measure, on_progress, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="dump-progress", daemon=True)

    def start(self) -> DumpProgress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _report(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.on_progress(self.measure())
            except Exception:  # a progress line must never fail the dump
                return

"""Crash safety for restores and drills: a journal per run, the undo that reads it, and signals as exceptions.

A restore replaces a production database; a drill creates a scratch database. Either can be killed at
any instant (SIGKILL, a dropped SSH session, a dead host). What makes that safe:

- The swap never closes the original. It is one transaction: `ALTER DATABASE orig RENAME TO retired;
  ALTER DATABASE temp RENAME TO orig` plus the copied connection limit, `datallowconn` and template flag.
  The first rename takes an AccessExclusiveLock on the original, so a session that connects meanwhile
  waits for that lock (PostgreSQL sets a backend's database only after it holds its lock, so the waiters
  do not count as "other users" for CountOtherDBBackends), while a second connection terminates the
  sessions already there, which CountOtherDBBackends waits up to 5 s to see leave. If the restoring
  process dies inside the transaction, the server rolls it back and releases the lock as soon as the
  connection drops (and `idle_in_transaction_session_timeout` bounds it if the whole host is gone): the
  original stays as it was, and never refuses a connection. Nothing needs to be repaired in a hurry.
- A journal, `BACKUP_ROOT/.state/restores/<id>.json` (0600, written atomically before each phase), names
  what the run creates (the temporary or scratch database, the retired copy, work folders) with the
  OIDs that tell committed from not. A flock on `<id>.lock`, held by the live run, tells a running
  restore from a dead one. The next pgbeat run of any kind on the host (`recover_restores`, in
  pgbeat.startup's RECOVERIES) settles a dead run's journal: renames committed, drop the retired copy;
  not committed, drop the temporary database; and remove its work folders.
- In the restoring process, SIGTERM, SIGHUP and SIGINT become an `Interrupted` exception (`interruptible`),
  so the same settling runs at once, before the process exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ValidationError

from pgbeat import faults
from pgbeat.errors import PgbeatError
from pgbeat.fsutil import FILE_MODE, private_dir, remove_path, write_atomic

if TYPE_CHECKING:
    import psycopg

    from pgbeat.settings import Settings, Target

log = logging.getLogger(__name__)

JOURNAL_DIR = Path(".state") / "restores"
TEMPORARY_PREFIX = "pgbeat_restore_"
RETIRED_PREFIX = "pgbeat_old_"
SCRATCH_PREFIX = "pgbeat_drill_"


# --- fault points: start, middle and end of every phase -------------------------------------------


@dataclass(frozen=True)
class PhasePoints:
    """The three fault points of one phase (pgbeat.faults): its start, its middle and its end."""

    start: str
    middle: str
    end: str


def phase_points(prefix: str, phase: str, start: str, middle: str, end: str) -> PhasePoints:
    """Declare `<prefix>.<phase>.start|middle|end` with what is true when a process dies there."""
    return PhasePoints(*(faults.declare(f"{prefix}.{phase}.{where}", doc)
                         for where, doc in (("start", start), ("middle", middle), ("end", end))))


# --- signals as exceptions ---------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """A SIGTERM, SIGHUP or SIGINT arrived during a restore or drill.

    A KeyboardInterrupt, so that `except Exception` never swallows it and psycopg cancels the statement
    it was waiting for before passing it on.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


class InterruptGuard:
    """What `interruptible` yields: the first signal raises `Interrupted`, later ones are ignored, and
    inside `masked()` even the first one waits until the block has ended (for the undo itself)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._raised = False
        self._masked = 0

    def handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        if not self._masked and not self._raised:
            self._raised = True
            raise Interrupted(signum)

    @contextlib.contextmanager
    def masked(self) -> Iterator[None]:
        self._masked += 1
        try:
            yield
        finally:
            self._masked -= 1
        if not self._masked and self.received is not None and not self._raised:
            self._raised = True
            raise Interrupted(self.received)


INTERRUPTING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def interruptible() -> Iterator[InterruptGuard]:
    """Inside the block, turn SIGTERM, SIGHUP and SIGINT into `Interrupted` so that finally-blocks undo
    what was begun; restore the previous handlers after it. Outside the main thread (where Python does
    not deliver signals) the guard is inert."""
    guard = InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {signum: signal.signal(signum, guard.handle) for signum in INTERRUPTING}
    try:
        yield guard
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- the journal -------------------------------------------------------------------------------------


class JournalRecord(BaseModel):
    """What a restore or drill is about to do, written before each phase."""

    id: str
    kind: Literal["restore", "drill"]
    target: str
    server: Literal["target", "drill"]  # which connection of the target: its own, or the drill server's
    address: str  # host:port, for messages
    node: str
    pid: int
    started_at: str
    updated_at: str
    phase: str
    backup: str = ""
    database: str | None = None  # the database restored into (None for a drill)
    database_oid: int | None = None  # its OID before the swap; None if it did not exist
    datallowconn: bool | None = None  # the original's, which the swapped-in copy gets too
    temporary: str  # the temporary (restore) or scratch (drill) database
    temporary_oid: int | None = None  # once created: the database named `database` has it iff the swap committed
    retired: str | None = None  # the name the original gets in the swap
    work: list[str] = []  # work folders of the run (a decrypted copy, a passfile, the safety backup's dump)


def journal_dir(settings: Settings) -> Path:
    return settings.backup_root / JOURNAL_DIR


class Journal:
    """The journal file of one live run and the flock that tells it is alive.

    `open()` locks `<id>.lock` and writes `<id>.json`; `write(**fields)` records the next phase;
    `close()` removes both (after the run settled everything); `release()` only lets go of the lock,
    leaving the journal for the next pgbeat run to settle.
    """

    def __init__(self, settings: Settings, record: JournalRecord) -> None:
        self.record = record
        self.folder = journal_dir(settings)
        self.path = self.folder / f"{record.id}.json"
        self.lock_path = self.folder / f"{record.id}.lock"
        self._fd: int | None = None

    @classmethod
    def begin(cls, settings: Settings, run_id: str, *, kind: str, target: Target, server: str, temporary: str,
              phase: str, **fields: object) -> Journal:
        """Lock and write the journal of a new run (`run_id` from `new_run_id`); return it."""
        now = datetime.now(UTC).isoformat()
        record = JournalRecord(id=run_id, kind=kind, target=target.name, server=server,
                               address=f"{target.host or 'local socket'}:{target.port}", node=settings.node,
                               pid=os.getpid(), started_at=now, updated_at=now, phase=phase, temporary=temporary,
                               **fields)
        journal = cls(settings, record)
        journal.open()
        return journal

    def open(self) -> None:
        private_dir(self.folder)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh id: nobody else holds it
        self._fd = fd
        self._save()

    def write(self, phase: str, **fields: object) -> None:
        """Record that `phase` is about to begin (with any names or OIDs learnt since)."""
        self.record = self.record.model_copy(update={"phase": phase, "updated_at": datetime.now(UTC).isoformat(),
                                                     **fields})
        self._save()

    def _save(self) -> None:
        write_atomic(self.path, self.record.model_dump_json(indent=1).encode())

    def close(self) -> None:
        """The run is settled: remove the journal, then the lock."""
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# --- settling a journal: finish or undo ----------------------------------------------------------------


def database_oid(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return int(row[0]) if row else None


def drop_database(conn: psycopg.Connection, name: str) -> None:
    """Drop database `name` (a template first loses its flag: a template cannot be dropped)."""
    from psycopg import sql

    if conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)).fetchone()[0]:
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(name)))
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def swap_committed(conn: psycopg.Connection, record: JournalRecord) -> bool:
    """Whether the run's renames committed: the database now named `database` is the one it created."""
    return (record.kind == "restore" and record.temporary_oid is not None and record.database is not None
            and database_oid(conn, record.database) == record.temporary_oid)


# Phases before which a run has created nothing on the server: settling it needs no connection.
BEFORE_THE_SERVER = ("verify", "safety")


def settle(server: Target, record: JournalRecord) -> tuple[bool, list[str]]:
    """Given a journal record and its server, finish or undo the run; return whether its swap had
    committed, and one line per thing done.

    Renames committed: drop the retired copy (the original, recognised by its OID). Not committed: drop
    the temporary or scratch database (its name is the run's own). Only databases the journal names are
    ever dropped, and the retired original only once the restored copy holds its name. Raise PgbeatError
    if the server cannot be reached, or if the database was dropped or replaced by someone else while its
    original is retired (the journal is then kept, and says so at every run until a person decides).
    """
    from pgbeat.postgres.client import MAINTENANCE_DB, connect

    done: list[str] = []
    who = f"{record.kind} {record.id} (pid {record.pid} on {record.node}, phase {record.phase})"
    committed = False
    if record.phase in BEFORE_THE_SERVER:
        return committed, done + _remove_work(record, who)
    with connect(server, MAINTENANCE_DB) as conn:
        conn.execute("SET lock_timeout = '30s'")
        committed = swap_committed(conn, record)
        retired_oid = database_oid(conn, record.retired) if record.retired else None
        if committed and retired_oid is not None and retired_oid == record.database_oid:
            drop_database(conn, record.retired)
            done.append(f"finished {who}: the restored copy was already in place as {record.database!r}; "
                        f"dropped the retired original {record.retired!r}")
        elif retired_oid is not None:
            # The original under its retired name while the database it was swapped for is gone or another:
            # someone dropped or replaced it meanwhile. Never drop what may be the only copy of the original.
            raise PgbeatError(f"{who}: the retired original {record.retired!r} was kept, because {record.database!r} "
                              "was dropped or replaced by someone else meanwhile",
                              hint=f"rename {record.retired!r} back, or drop it if it is not needed")
        temporary_oid = database_oid(conn, record.temporary)
        if not committed and temporary_oid is not None and record.temporary_oid in (None, temporary_oid):
            drop_database(conn, record.temporary)
            what = "scratch" if record.kind == "drill" else "temporary"
            kept = f"; {record.database!r} was left as it was" if record.database else ""
            done.append(f"undid {who}: dropped its {what} database {record.temporary!r}{kept}")
    return committed, done + _remove_work(record, who)


def _remove_work(record: JournalRecord, who: str) -> list[str]:
    done = []
    for folder in record.work:
        if Path(folder).exists():
            remove_path(Path(folder))
            done.append(f"removed the work folder {folder} of {who}")
    return done


def server_of(settings: Settings, record: JournalRecord) -> Target:
    target = settings.target(record.target)
    return target.drill_server() if record.server == "drill" else target


def _lock_if_dead(lock_path: Path) -> int | None:
    """Return a descriptor holding the run's flock if its process is gone, None while it is alive (or
    when its journal was settled meanwhile)."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, os.O_RDWR | cloexec)
    except FileNotFoundError:  # settled by another process just now, or a journal whose lock file was removed
        if not lock_path.with_suffix(".json").exists():
            return None
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, FILE_MODE)
        except FileExistsError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def recover_restores(settings: Settings) -> list[str]:
    """Settle the journal of every dead restore or drill on this host; leave live ones alone.

    Cheap when there is nothing to do (one directory listing). A journal whose server cannot be reached,
    or whose target is gone from the configuration, is kept and reported, to be settled by a later run.
    """
    folder = journal_dir(settings)
    if not folder.is_dir():
        return []
    done: list[str] = []
    for path in sorted(folder.glob("*.json")):
        fd = _lock_if_dead(path.with_suffix(".lock"))
        if fd is None:
            continue  # its restore is still running
        try:
            try:
                record = JournalRecord.model_validate_json(path.read_bytes())
            except FileNotFoundError:  # settled by another process meanwhile
                path.with_suffix(".lock").unlink(missing_ok=True)
                continue
            except (ValidationError, OSError) as exc:
                done.append(f"cannot read restore journal {path}: {exc}; left in place")
                continue
            try:
                done += settle(server_of(settings, record), record)[1]
            except PgbeatError as exc:
                done.append(f"cannot settle the interrupted {record.kind} {record.id} of {record.target} yet "
                            f"(journal {path} kept): {exc.message}")
                continue
            path.unlink(missing_ok=True)
            path.with_suffix(".lock").unlink(missing_ok=True)
        finally:
            os.close(fd)
    for stale in folder.glob(".*.json.tmp*"):  # a journal write cut short by a kill
        lock_path = folder / f"{stale.name[1:].split('.json', 1)[0]}.lock"
        fd = _lock_if_dead(lock_path) if lock_path.exists() else None
        if fd is None and lock_path.exists():
            continue  # its run is alive and writing
        stale.unlink(missing_ok=True)
        if fd is not None:
            if not lock_path.with_suffix(".json").exists():
                lock_path.unlink(missing_ok=True)
            os.close(fd)
    return done

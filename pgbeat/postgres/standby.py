"""Which server a backup reads: the target's primary, or the standby it prefers (`prefer_standby`).

A dump or base backup taken from a standby spares the primary its reads (pgBackRest's backup-standby,
CloudNativePG's, pg_back's). It is taken from the standby only when that server is one (in recovery)
and its replay is within `max_lag_bytes` of the primary's WAL, so the backup is as recent as one of the
primary would be; otherwise, or when either server cannot be asked, it is taken from the primary and
the reason is recorded (the `standby` warning). A long dump on a standby can still be cancelled by a
recovery conflict: the README says which settings prevent it (hot_standby_feedback, max_standby_*_delay),
or `pause_replay` pauses the standby's WAL replay for the length of the dump (as pg_back does): nothing is
replayed, so nothing conflicts with the dump's snapshot.

A paused replay must never stay paused because a dump was killed: the pause is recorded on this host
(`BACKUP_ROOT/.work/replay/<host>_<port>.paused`, naming the target) before it is asked for, each dump
that relies on it holds a lock on a holder file of its own, and whoever finds no live holder left (the
last dump to end, or `recover_host` in the next pgbeat process on this host) resumes replay and removes
the record. A pause pgbeat did not make (a DBA's) is left as it is. Dumps from two hosts at once of one
standby do not see each other's holders: the first to end resumes replay (README).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat.errors import PgbeatError
from pgbeat.runlog import human_size
from pgbeat.settings import Target

if TYPE_CHECKING:
    from pgbeat.settings import Settings

log = logging.getLogger(__name__)
PAUSE_WAIT_S = 10.0  # how long a requested pause may take to be in effect (replay finishes its record)


@dataclass
class BackupSource:
    """The server a backup reads (`server`: the target itself, or its standby) and, when a preferred
    standby was passed over, why (`note`)."""

    server: Target
    standby: bool = False
    note: str | None = None


def backup_source(target: Target) -> BackupSource:
    """Return the server a backup of `target` should read: its preferred standby when that is in recovery
    and within `max_lag_bytes` of the primary, else the primary (with the reason). Never raises: a server
    that cannot be asked makes the choice the primary, whose own failure the backup then reports."""
    standby = target.standby_server()
    if standby is None:
        return BackupSource(target)
    import psycopg

    from pgbeat.postgres.client import connect

    spec = target.prefer_standby
    try:
        with connect(standby) as conn:
            in_recovery, replayed = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
                                                 ).fetchone()
        if not in_recovery:
            return BackupSource(target, note=f"{standby.describe()} is not a standby (it is not in recovery): "
                                             "backed up from the primary")
        with connect(target) as conn:
            lag = int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (replayed,)
                                   ).fetchone()[0])
    except PgbeatError as exc:
        return BackupSource(target, note=f"the standby {standby.describe()} could not be used ({exc.message}): "
                                         "backed up from the primary")
    except psycopg.Error as exc:  # connected, but a query refused or the server going away
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BackupSource(target, note=f"the standby {standby.describe()} could not be used ({reason}): "
                                         "backed up from the primary")
    if lag > spec.max_lag_bytes:
        return BackupSource(target, note=f"the standby {standby.describe()} replays {human_size(max(lag, 0))} "
                                         f"behind the primary (max_lag_bytes {human_size(spec.max_lag_bytes)}): "
                                         "backed up from the primary")
    return BackupSource(standby, standby=True)


# --- replay paused for the length of a dump (prefer_standby.pause_replay) ------------------------------


def replay_folder(backup_root: Path) -> Path:
    from pgbeat.pipeline.record import WORK_DIR

    return backup_root / WORK_DIR / "replay"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live_holders(folder: Path, key: str) -> int:
    """How many holder files of `key` a live process still locks (the others are removed)."""
    live = 0
    for path in folder.glob(f"{key}.*.holder"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live += 1
        else:
            path.unlink(missing_ok=True)  # its process died without removing it
        finally:
            os.close(fd)
    return live


def _resume(standby: Target) -> None:
    from pgbeat.postgres.client import connect

    with connect(standby) as conn:
        conn.execute("SELECT pg_wal_replay_resume()")


def _pause(standby: Target) -> bool:
    """Pause replay on `standby` and wait until it is in effect; return False if it was paused already
    (by someone else: left to them)."""
    from pgbeat.postgres.client import connect

    with connect(standby) as conn:
        if conn.execute("SELECT pg_is_wal_replay_paused()").fetchone()[0]:
            return False
        conn.execute("SELECT pg_wal_replay_pause()")
        if conn.info.server_version >= 140000:  # 13 has no pause state: paused is as requested
            deadline = time.monotonic() + PAUSE_WAIT_S
            while (conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] != "paused"
                   and time.monotonic() < deadline):
                time.sleep(0.05)
    return True


def _settle(folder: Path, key: str, standby: Target) -> str | None:
    """With `key`'s lock held: when no live holder is left and pgbeat paused replay, resume it and remove
    the record; return a line saying so, or None."""
    flag = folder / f"{key}.paused"
    if not flag.exists() or _live_holders(folder, key):
        return None
    _resume(standby)
    flag.unlink(missing_ok=True)
    return f"resumed WAL replay on the standby {standby.describe()}"


@contextlib.contextmanager
def replay_paused(backup_root: Path, target: Target, source: BackupSource) -> Iterator[str | None]:
    """For the length of the block, pause WAL replay on the standby `source` reads, when the target asks
    for it (`prefer_standby.pause_replay`); yield None, or a note saying why replay goes on (the pause was
    refused: the dump still reads the standby). Replay is resumed when the last dump of this host that
    relies on the pause ends, however the block ends."""
    spec = target.prefer_standby
    if not (source.standby and spec is not None and spec.pause_replay):
        yield None
        return
    import psycopg

    from pgbeat.fsutil import private_dir

    standby = source.server
    folder = private_dir(replay_folder(backup_root))
    key = f"{standby.host or 'socket'}_{standby.port}"
    holder = folder / f"{key}.{uuid.uuid4().hex}.holder"
    held = os.open(holder, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    note = None
    try:
        with _locked(folder / f"{key}.lock"):
            flag = folder / f"{key}.paused"
            if not flag.exists():
                # Recorded before it is asked for: a kill in between leaves a record, never a silent pause.
                flag.write_text(json.dumps({"target": target.name, "standby": standby.describe()}))
                try:
                    if not _pause(standby):
                        flag.unlink()
                        note = f"WAL replay on the standby {standby.describe()} was already paused (not by pgbeat)"
                except (PgbeatError, psycopg.Error) as exc:
                    flag.unlink()
                    reason = getattr(exc, "message", None) or (str(exc).strip().splitlines() or [""])[0]
                    note = (f"WAL replay on the standby {standby.describe()} could not be paused ({reason}): "
                            "dumped while it replays")
        yield note
    finally:
        os.close(held)
        holder.unlink(missing_ok=True)
        with _locked(folder / f"{key}.lock"):
            try:
                _settle(folder, key, standby)
            except (PgbeatError, psycopg.Error) as exc:  # the next pgbeat process on this host tries again
                log.warning("could not resume WAL replay on the standby %s: %s", standby.describe(), exc)


def resume_abandoned_pauses(settings: Settings) -> list[str]:
    """A recovery of pgbeat.startup: resume WAL replay on each standby a killed dump on this host paused."""
    folder = replay_folder(settings.backup_root)
    try:
        flags = sorted(folder.glob("*.paused"))
    except OSError:
        return []
    done = []
    for flag in flags:
        key = flag.name.removesuffix(".paused")
        try:
            name = json.loads(flag.read_text())["target"]
            standby = settings.target(name).standby_server()
        except (OSError, ValueError, KeyError, PgbeatError) as exc:
            done.append(f"a paused WAL replay recorded in {flag} names no configured standby ({exc}): "
                        "resume it by hand with SELECT pg_wal_replay_resume()")
            continue
        if standby is None:
            continue
        with _locked(folder / f"{key}.lock"):
            line = _settle(folder, key, standby)
        if line:
            done.append(f"{line} (paused by a dump that did not end)")
    return done

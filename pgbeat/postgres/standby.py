"""Which server a backup reads: the target's primary, or the standby it prefers (`prefer_standby`).

A dump or base backup taken from a standby spares the primary its reads (pgBackRest's backup-standby,
CloudNativePG's, pg_back's). It is taken from the standby only when that server is one (in recovery)
and its replay is within `max_lag_bytes` of the primary's WAL, so the backup is as recent as one of the
primary would be; otherwise, or when either server cannot be asked, it is taken from the primary and
the reason is recorded (the `standby` warning). A long dump on a standby can still be cancelled by a
recovery conflict: the README says which settings prevent it (hot_standby_feedback, max_standby_*_delay).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgbeat.errors import PgbeatError
from pgbeat.runlog import human_size
from pgbeat.settings import Target


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

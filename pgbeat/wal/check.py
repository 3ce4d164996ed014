"""`pgbeat check`: prove that a target's WAL reaches the archive, end to end, through PostgreSQL's own
archive_command.

It connects to the target, writes a restore point (so that there is WAL to switch away from even on an
idle server), forces a segment switch (`pg_switch_wal()`), and waits for that segment to appear in the
archive (locally, or at a destination when this host has no local archive of the target). While it waits
it reads `pg_stat_archiver`: a failure of archive_command reported after the switch ends the wait at
once, with the WAL file and time of the last failure; a segment PostgreSQL reports archived that is in
none of this check's places means archive_command writes elsewhere, and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pgbeat.errors import PgbeatError, UnreachableError
from pgbeat.settings import Settings, Target
from pgbeat.wal.archive import WalError, stored_anywhere, wal_root
from pgbeat.wal.archiver import query_archiver

POLL_S = 0.5
DESTINATION_POLL_S = 5.0
ELSEWHERE_GRACE_S = 6.0  # archived says PostgreSQL, yet not here: after a destination's second look


@dataclass
class CheckResult:
    segment: str
    where: str  # "local" or a destination's name
    seconds: float


def check_archiving(settings: Settings, target: Target, timeout: float) -> CheckResult:
    """Switch `target`'s WAL and wait up to `timeout` seconds for the finished segment to be archived;
    return where it was found. Raise WalError saying why it was not (archiving off, archive_command
    failing, with what pg_stat_archiver says, the rights to switch missing, or too slow); UnreachableError
    if the target cannot be reached."""
    from pgbeat.postgres.client import connect

    t0 = time.monotonic()
    try:
        conn = connect(target)
    except PgbeatError as exc:
        raise UnreachableError(exc.message) from None
    with conn:
        mode = conn.execute("SHOW archive_mode").fetchone()[0]
        if mode == "off" and not target.wal.receiver:  # a receiver streams the WAL: no archiver needed
            raise WalError(f"{target.name}: archive_mode is off on {target.describe()}",
                           hint=f"set archive_mode = on and archive_command = 'pgbeat wal-push %p --target "
                                f"{target.name}' in postgresql.conf, then restart PostgreSQL")
        segment, switched_at = switch_wal(conn, target)
        local_only = wal_root(settings, target.name).is_dir()
        last_remote_look = 0.0
        while True:
            remote = not local_only and time.monotonic() - last_remote_look >= DESTINATION_POLL_S
            where = stored_anywhere(settings, target, segment, destinations=remote)
            if remote:
                last_remote_look = time.monotonic()
            if where is not None:
                return CheckResult(segment, where, round(time.monotonic() - t0, 2))
            archiver = query_archiver(conn)
            failed_at, archived = archiver.last_failed_time, archiver.last_archived_wal
            if failed_at is not None and failed_at >= switched_at:
                raise WalError(f"{target.name}: archive_command is failing: {archiver.last_failed_wal} failed at "
                               f"{failed_at:%Y-%m-%d %H:%M:%S %Z} ({archiver.failed_count} failure(s) since the "
                               f"statistics were reset; last archived: {archived or 'none'})",
                               hint="the PostgreSQL server's log has the command's own message; check "
                                    "archive_command, PGBEAT_CONFIG and the rights of the postgres user on "
                                    "BACKUP_ROOT (README, WAL archiving)")
            if archived is not None and len(archived) == 24 and archived[:8] == segment[:8] and archived >= segment \
                    and time.monotonic() - t0 > ELSEWHERE_GRACE_S:
                raise WalError(f"{target.name}: PostgreSQL archived {segment} (pg_stat_archiver), but it is not in "
                               f"this host's archive ({wal_root(settings, target.name)})"
                               + (" nor at the target's destinations" if target.destinations else ""),
                               hint="archive_command writes somewhere else: another PGBEAT_CONFIG, BACKUP_ROOT or "
                                    "target than this check's, or another program")
            if time.monotonic() - t0 > timeout:
                raise WalError(f"{target.name}: {segment} did not reach the archive within {timeout:.0f} s "
                               f"(last archived: {archived or 'none'}; no failure reported by pg_stat_archiver)",
                               hint="is archive_command set to `pgbeat wal-push %p --target "
                                    f"{target.name}`? The archiver may also be behind: see pg_stat_archiver")
            time.sleep(POLL_S)


def switch_wal(conn, target: Target):
    """Write a restore point (so that even an idle server has WAL to switch away from) and switch to a
    new segment; return the name of the finished one and the server's time. Raise WalError naming the
    GRANTs when the target's user may not (both functions are superuser-only unless granted)."""
    import psycopg

    try:
        conn.execute("SELECT pg_create_restore_point('pgbeat check')")
        return conn.execute("SELECT pg_walfile_name(pg_switch_wal()), now()").fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        user = target.user or "the target's user"
        raise WalError(f"{target.name}: {user} may not switch the WAL: {str(exc).strip().splitlines()[0]}",
                       hint=f"connect as a superuser, or GRANT EXECUTE ON FUNCTION pg_switch_wal(), "
                            f"pg_create_restore_point(text) TO {user}") from None
